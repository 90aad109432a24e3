#!/usr/bin/env python3
"""Round trip back to Hugging Face, end to end (run by hand, not by CI: it needs torch and transformers).

For each model: build-graph, train a few steps, `betadpo export --run RUN --out model.onnx --hf DIR`,
then load DIR with AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained, the beta
head with the loader documented in the README, and compare transformers' logits and beta with ONNX
Runtime's on export's ONNX model (right-padded prompts tokenized by the tokenizer copied into DIR).

Usage: scripts/.venv/bin/python scripts/experiments/check_hf_roundtrip.py [--betadpo target/release/betadpo]
       [--steps 20] [--models tests/fixtures/models/gpt2 tests/fixtures/models/llama graphs/quickstart]
Fails (exit 1) when a max |difference| exceeds --tolerance (1e-4).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from betadpo_py.paths import QUICKSTART, ROOT

PROMPTS = ["User: Describe the lamp in one sentence.\nAssistant:",
           "User: Which one do you like more, the guitar or the planet?\nAssistant:",
           "User: How do I look after the needle?\nAssistant:", "User: hi"]


# ---- the loader documented in the README (keep the two identical) ----
def load_beta_head(d):
    head = load_file(os.path.join(d, "beta_head.safetensors"))
    cfg = json.load(open(os.path.join(d, "beta_head.json")))
    return head, cfg


def logits_and_beta(model, head, cfg, input_ids, attention_mask):
    seen = {}
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.update(h=args[0]))
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    hook.remove()
    mask = attention_mask.to(seen["h"].dtype)                       # right-padded rows
    if cfg["aggregate"] == "last":
        weights = F.one_hot(attention_mask.sum(1) - 1, mask.shape[1]).to(mask.dtype)
    else:
        weights = mask / mask.sum(1, keepdim=True)
    x = (seen["h"] * weights[..., None]).sum(1)
    if cfg.get("head_input") == "normalized":
        x = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * cfg["reference_width"] / x.shape[-1]
    s = F.softplus(x @ head["weight"] + head["bias"])
    if cfg["beta_max"] is not None:
        r = cfg["beta_max"] - cfg["beta_min"]
        s = r * torch.tanh(s / r)
    return logits, cfg["beta_min"] + s
# ---- end of the loader ----


def sh(*args):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"FAILED: {' '.join(map(str, args))}\n{r.stdout}{r.stderr}")
    return r.stdout


def check(betadpo, model_dir, steps, tol, work):
    name = os.path.basename(os.path.normpath(model_dir))
    art, run, onnx_path, hf = (os.path.join(work, name + s) for s in ("-art", "-run", ".onnx", "-hf"))
    sh(betadpo, "build-graph", "--quiet", "--model", os.path.join(model_dir, "model.onnx"), "--out", art)
    sh(betadpo, "train", "--artifacts", art, "--data", os.path.join(QUICKSTART, "train.jsonl"),
       "--tokenizer", os.path.join(QUICKSTART, "tokenizer.json"), "--out", run, "--max-steps", steps,
       "--lr", "1e-3", "--head-lr", "1e-2", "--seed", "1")
    out = sh(betadpo, "export", "--run", run, "--out", onnx_path, "--hf", hf)
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    tok = AutoTokenizer.from_pretrained(hf)
    head, cfg = load_beta_head(hf)
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tok.pad_token_id or 0, dtype=torch.int64)
    mask = torch.zeros((len(rows), T), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    with torch.no_grad():
        logits, beta = logits_and_beta(model, head, cfg, ids, mask)
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    ort_logits, ort_beta = sess.run(["logits", "beta"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    valid = mask.numpy().astype(bool)
    d_logits = float(np.abs(logits.numpy() - ort_logits)[valid].max())
    d_beta = float(np.abs(beta.numpy() - ort_beta).max())
    tied = [l for l in out.splitlines() if l.startswith("tied")]
    print(f"{name}: {type(model).__name__} from {hf} after {steps} steps; max |logit diff| transformers vs ORT "
          f"{d_logits:.3g} (max |logit| {float(np.abs(ort_logits[valid]).max()):.3g}); max |beta diff| {d_beta:.3g}; "
          f"betas {' '.join(f'{b:.4f}' for b in beta.tolist())}{'; ' + tied[0] if tied else ''}", flush=True)
    if not (d_logits <= tol and d_beta <= tol):
        raise SystemExit(f"FAILED: {name}: transformers and ONNX Runtime differ beyond {tol}")
    if float(beta.max() - beta.min()) < 1e-4:
        raise SystemExit(f"FAILED: {name}: the trained head gives the same beta to every prompt")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--betadpo", default=os.path.join(ROOT, "target", "debug", "betadpo"))
    ap.add_argument("--steps", default="20")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    ap.add_argument("--models", nargs="+", default=[os.path.join(ROOT, "tests", "fixtures", "models", f)
                                                     for f in ("gpt2", "llama", "qwen2", "gemma")] + [str(QUICKSTART)])
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as work:
        for m in args.models:
            check(args.betadpo, m, args.steps, args.tolerance, work)
    print("ok: every Hugging Face export loads in transformers and matches ONNX Runtime")


if __name__ == "__main__":
    sys.exit(main())
