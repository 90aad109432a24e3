#!/usr/bin/env python3
"""Does `betadpo train` with its default learning rate leave a real model's answers intact? (not CI)

On SmolLM2-135M-Instruct (exported by scripts/tools/export_smollm2.sh), for full fine-tuning and for LoRA rank 16:
build-graph, export the untrained model and ask it a fixed factual question (greedy, through the chat
template); train --max-steps 30 on the first pairs of ../shared/fixtures/prefs/train.jsonl with no --lr (the
default); export the trained model (LoRA merged) and ask again. Prints both answers and the run's first lines
(the rates it trained with). Passes when each answer after training is unchanged or still names the
expected fact. `--lr X` trains with X instead, to show what a larger rate does.

Usage (a release build of betadpo):
    bash scripts/tools/export_smollm2.sh /tmp/smollm2
    scripts/.venv/bin/python scripts/experiments/check_default_lr.py --onnx-dir /tmp/smollm2 [--work DIR] [--steps 30]
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from betadpo_py.paths import ROOT

PROMPT = "What is the capital of France?"
FACT = "Paris"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{res.stderr}")
    return res


def answer(a, model: Path) -> str:
    res = run([a.betadpo, "infer", "--model", str(model), "--tokenizer", str(a.onnx_dir / "tokenizer.json"), "--prompt", PROMPT,
               "--chat", "--generate", str(a.tokens), "--json"])
    rec = json.loads(res.stdout.strip().splitlines()[0])
    return rec["completion"]


def case(a, work: Path, name: str, build_flags: list[str], merge: bool) -> bool:
    art, runs = work / f"art-{name}", work / f"run-{name}"
    if not (art / "manifest.json").exists():
        run([a.betadpo, "build-graph", "--model", str(a.onnx_dir / "model.onnx"), "--out", str(art), "--quiet", *build_flags])
    before = work / f"before-{name}.onnx"
    if not before.exists():
        run([a.betadpo, "export", "--artifacts", str(art), "--out", str(before)] + (["--merge"] if merge else []))
    text_before = answer(a, before)
    shutil.rmtree(runs, ignore_errors=True)
    data = work / "train.jsonl"
    cmd = [a.betadpo, "train", "--artifacts", str(art), "--data", str(data), "--tokenizer", str(a.onnx_dir / "tokenizer.json"),
           "--out", str(runs), "--max-steps", str(a.steps), "--threads", str(a.threads), "--logging-steps", "10"]
    if a.lr is not None:
        cmd += ["--lr", str(a.lr)]
    res = run(cmd)
    first = [l for l in res.stderr.splitlines() if l.startswith(("train:", "learning rate:", "beta:", "trainable:", "step "))]
    after = work / f"after-{name}.onnx"
    run([a.betadpo, "export", "--run", str(runs), "--out", str(after)] + (["--merge"] if merge else []))
    text_after = answer(a, after)
    ok = text_after == text_before or FACT in text_after
    print(f"\n== {name} ({' '.join(build_flags) or 'full fine-tuning'}), {a.steps} steps, lr {a.lr or 'default'}")
    for line in first:
        print("   ", line)
    print(f"    before: {text_before!r}\n    after:  {text_after!r}\n    {'unchanged' if text_after == text_before else 'changed'}; "
          f"{'PASS' if ok else 'FAIL'} ({FACT!r} {'in' if FACT in text_after else 'not in'} the answer)")
    for f in (after,):
        f.unlink(missing_ok=True)
        Path(str(f) + ".data").unlink(missing_ok=True)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx-dir", type=Path, required=True, help="model.onnx + tokenizer.json of SmolLM2 (export_smollm2.sh)")
    ap.add_argument("--betadpo", default=str(ROOT / "target" / "release" / "betadpo"))
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "fixtures" / "prefs" / "train.jsonl")
    ap.add_argument("--pairs", type=int, default=240, help="the first N pairs of --data (30 steps of 8)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, help="train with this rate instead of the default")
    ap.add_argument("--tokens", type=int, default=24, help="greedy tokens of the answer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path)
    ap.add_argument("cases", nargs="*", default=["full", "lora"])
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="check-default-lr-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = a.data.read_text().splitlines()[: a.pairs]
    (work / "train.jsonl").write_text("\n".join(rows) + "\n")
    flags = {"full": ([], False), "lora": (["--lora-rank", "16"], True)}
    ok = all([case(a, work, c, *flags[c]) for c in a.cases])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
