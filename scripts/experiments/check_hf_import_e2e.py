#!/usr/bin/env python3
"""End to end from a Hugging Face folder, with no export step (docs/hf-import.md):

  1. betadpo build-graph --model FOLDER --lora-rank 16     (betadpo writes the graph from config.json + safetensors)
  2. betadpo train, without --tokenizer                      (the folder's tokenizer is found through the manifest)
  3. betadpo export --out policy.onnx, and export --hf PEFT_DIR
  4. logits on a padded batch of prompts: onnxruntime on policy.onnx (what `betadpo infer` runs) against
     transformers + PEFT: AutoModelForCausalLM.from_pretrained(FOLDER) + PeftModel.from_pretrained(PEFT_DIR),
     and adapter_config.json's base_model_name_or_path must name FOLDER.
Steps 1-3 need only the betadpo binary; step 4 needs the scripts venv (torch, transformers, peft).
Exits non-zero when |PEFT - betadpo| exceeds 1e-4 x max(1, max |logit|) on the real tokens.

  scripts/.venv/bin/python scripts/experiments/check_hf_import_e2e.py --folder /tmp/SmolLM2-135M-Instruct [--work DIR]
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

from betadpo_py.paths import ROOT
from betadpo_py.runs import prompt_batch, sh


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", required=True, help="Hugging Face causal-LM folder (config.json, safetensors, tokenizer)")
    ap.add_argument("--work", default="/tmp/hf-import-e2e")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--betadpo", default=os.path.join(ROOT, "target/release/betadpo"))
    a = ap.parse_args()
    folder = os.path.realpath(a.folder)
    os.makedirs(a.work, exist_ok=True)
    w = lambda *p: os.path.join(a.work, *p)
    data = w("pairs.jsonl")
    with open(os.path.join(ROOT, "graphs/quickstart/train.jsonl")) as src, open(data, "w") as dst:
        dst.writelines(line for i, line in enumerate(src) if i < 8)
    b = a.betadpo
    for d in ("art", "run", "peft", "policy.onnx", "policy.onnx.data"):
        subprocess.run(["rm", "-rf", w(d)])
    sh(b, "build-graph", "--model", folder, "--out", w("art"), "--lora-rank", str(a.rank), "-q")
    sh(b, "train", "--artifacts", w("art"), "--data", data, "--out", w("run"), "--max-steps", str(a.steps),
       "--batch-size", "4", "--lr", "3e-3", "--quiet")
    sh(b, "export", "--run", w("run"), "--out", w("policy.onnx"))
    sh(b, "export", "--run", w("run"), "--hf", w("peft"))

    import onnxruntime as ort
    import torch
    from peft import PeftModel
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    t = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    ids, mask = prompt_batch(t)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.tile(np.arange(ids.shape[1], dtype=np.int64), (ids.shape[0], 1))}
    s = ort.InferenceSession(w("policy.onnx"), providers=["CPUExecutionProvider"])
    ours = s.run(["logits"], {k: v for k, v in feeds.items() if k in {i.name for i in s.get_inputs()}})[0]

    adapter_config = json.load(open(w("peft", "adapter_config.json")))
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        peft_model = PeftModel.from_pretrained(base, w("peft")).eval()
        peft_logits = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    m = mask.astype(bool)
    d = lambda x, y: float(np.abs(x[m] - y[m]).max())
    scale = max(1.0, float(np.abs(peft_logits[m]).max()))
    report = {
        "max |logit|": scale,
        "transformers+PEFT vs betadpo (policy.onnx)": d(peft_logits, ours),
        "relative": d(peft_logits, ours) / scale,
        "adapters move the logits by (PEFT vs base)": d(peft_logits, base_logits),
        "adapter_config base_model_name_or_path": adapter_config.get("base_model_name_or_path"),
    }
    print(json.dumps(report, indent=1))
    ok = report["relative"] <= 1e-4 and report["adapter_config base_model_name_or_path"] == folder
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
