#!/usr/bin/env python3
"""One model, two ways in, one training run (docs/hf-import.md): a Hugging Face folder given to
`betadpo build-graph --model FOLDER` directly, and the same folder exported to ONNX by PyTorch
(`scripts/tools/export_hf.py --model FOLDER`, dynamo) then built from its model.onnx. Both artifacts train
the same steps on the same pairs with the folder's tokenizer; every metric of every logged step
(`metrics.jsonl`: loss, rewards, margins, beta, grad_norm, log-probs, ...) must agree within 1e-5 relative
(or 1e-6 absolute near zero). Exits non-zero otherwise.

  scripts/.venv/bin/python scripts/experiments/check_hf_import_same_run.py [--folder tests/fixtures/hf/llama] [--steps 10]

Needs the scripts venv (torch, transformers, onnxscript) for the export; the rest is the betadpo binary.
"""
import argparse
import json
import math
import os
import shutil
import sys

from betadpo_py.paths import ROOT
from betadpo_py.runs import sh

# what a run logs that is not a number of the training itself (besides timings: keys with "time" or "per_second")
NOT_COMPARED = {"step", "epoch"}


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def differences(a, b):
    """The worst relative difference per metric key, and the keys or steps that do not pair up."""
    problems, worst = [], {}
    if len(a) != len(b):
        problems.append(f"{len(a)} logged records against {len(b)}")
    for ra, rb in zip(a, b):
        for k in sorted(set(ra) | set(rb)):
            if k in NOT_COMPARED or "time" in k or "per_second" in k:
                continue
            va, vb = ra.get(k), rb.get(k)
            if not isinstance(va, (int, float)) or not isinstance(vb, (int, float)):
                if va != vb:
                    problems.append(f"step {ra.get('step')}: {k} {va!r} vs {vb!r}")
                continue
            if math.isnan(va) and math.isnan(vb):
                continue
            d = abs(va - vb) / max(abs(va), abs(vb), 0.1)
            worst[k] = max(worst.get(k, 0.0), d)
            if abs(va - vb) > max(1e-5 * max(abs(va), abs(vb)), 1e-6):
                problems.append(f"step {ra.get('step')}: {k} {va!r} vs {vb!r}")
    return worst, problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default=os.path.join(ROOT, "tests/fixtures/hf/llama"), help="Hugging Face causal-LM folder")
    ap.add_argument("--work", default="/tmp/hf-import-same-run")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--betadpo", default=os.path.join(ROOT, "target/release/betadpo"))
    a = ap.parse_args()
    folder = os.path.realpath(a.folder)
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    w = lambda *p: os.path.join(a.work, *p)
    data = w("pairs.jsonl")
    with open(os.path.join(ROOT, "graphs/quickstart/train.jsonl")) as src, open(data, "w") as dst:
        dst.writelines(line for i, line in enumerate(src) if i < 32)

    sh(sys.executable, os.path.join(ROOT, "scripts/tools/export_hf.py"), "--model", folder, "--out", w("onnx"))
    b = a.betadpo
    sources = {"folder": folder, "export": w("onnx", "model.onnx")}
    for name, model in sources.items():
        sh(b, "build-graph", "--model", model, "--out", w(f"art-{name}"), "-q")
        sh(b, "train", "--artifacts", w(f"art-{name}"), "--data", data, "--tokenizer", os.path.join(folder, "tokenizer.json"),
           "--out", w(f"run-{name}"), "--max-steps", str(a.steps), "--batch-size", "4", "--lr", "1e-3", "--logging-steps", "1",
           "--seed", "7", "--threads", "1", "--quiet")
    ours, theirs = metrics(w("run-folder")), metrics(w("run-export"))
    worst, problems = differences(ours, theirs)
    print(json.dumps({"records": len(ours), "worst relative difference per metric": worst}, indent=1, sort_keys=True))
    for p in problems[:20]:
        print("DIFFERS:", p)
    print("OK" if not problems and ours else "FAILED")
    raise SystemExit(0 if not problems and ours else 1)


if __name__ == "__main__":
    main()
