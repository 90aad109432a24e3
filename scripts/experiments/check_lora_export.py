#!/usr/bin/env python3
"""LoRA deployment check on a real model: betadpo's merged, unmerged and adapter-file exports against
transformers + PEFT loading betadpo's PEFT directory.

Steps (each printed with its timing):
  1. build-graph --lora-rank R on MODEL_DIR/model.onnx (needs the hf_export.json that export_hf.py
     writes beside it; `export_hf.py ... --map-only` adds it to an existing export);
  2. train a few steps with a large learning rate on a few pairs, so every B is non-zero;
  3. export --merge, export (unmerged), export --adapter FILE.onnx_adapter, export --hf PEFT_DIR;
  4. logits on a padded batch of prompts: onnxruntime on the three ONNX forms (the adapter file made
     active with RunOptions.add_active_adapter), and PeftModel.from_pretrained(base, PEFT_DIR) on the
     Hugging Face model the ONNX file was exported from (loaded as export_hf.py loads it).
Prints the max |logit| differences; exits non-zero when merged vs unmerged or the adapter form
exceeds 1e-5 x max(1, max |logit|) or PEFT vs betadpo exceeds 1e-4 x max(1, max |logit|).

  scripts/.venv/bin/python scripts/experiments/check_lora_export.py --onnx-dir /tmp/smollm2 \
      --hf-model DIR --gguf-file FILE [--rank 16] [--work /tmp/lora-export-check]
"""
import argparse
import json
import os
import sys

import numpy as np

from betadpo_py import export_hf as E
from betadpo_py.paths import ROOT
from betadpo_py.runs import prompt_batch, sh


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx-dir", required=True, help="model.onnx + hf_export.json + tokenizer.json")
    ap.add_argument("--hf-model", required=True, help="what export_hf.py --model was given")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--work", default="/tmp/lora-export-check")
    ap.add_argument("--betadpo", default=os.path.join(ROOT, "target/release/betadpo"))
    a = ap.parse_args()
    import onnxruntime as ort
    import torch
    from peft import PeftModel
    from tokenizers import Tokenizer

    os.makedirs(a.work, exist_ok=True)
    w = lambda *p: os.path.join(a.work, *p)
    model = os.path.join(a.onnx_dir, "model.onnx")
    tok = os.path.join(a.onnx_dir, "tokenizer.json")
    data = w("pairs.jsonl")
    with open(os.path.join(ROOT, "graphs/quickstart/train.jsonl")) as src, open(data, "w") as dst:
        for i, line in enumerate(src):
            if i == 8:
                break
            dst.write(line)
    b = a.betadpo
    sh(b, "build-graph", "--model", model, "--out", w("art"), "--lora-rank", str(a.rank), "-q")
    sh(b, "train", "--artifacts", w("art"), "--data", data, "--tokenizer", tok, "--out", w("run"), "--max-steps", "3",
       "--batch-size", "4", "--lr", "3e-3", "--threads", "2", "--quiet")
    sh(b, "export", "--run", w("run"), "--out", w("merged.onnx"), "--merge")
    sh(b, "export", "--run", w("run"), "--out", w("unmerged.onnx"))
    sh(b, "export", "--run", w("run"), "--out", w("inputs.onnx"), "--adapter", w("policy.onnx_adapter"))
    sh(b, "export", "--run", w("run"), "--hf", w("peft"))

    t = Tokenizer.from_file(tok)
    ids, mask = prompt_batch(t)
    feeds = {"input_ids": ids, "attention_mask": mask}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2

    def run(path, adapter=None):
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        ro = ort.RunOptions()
        if adapter:
            ad = ort.LoraAdapter()
            ad.Load(adapter)
            ro.add_active_adapter(ad)
        f = {k: v for k, v in feeds.items() if k in {i.name for i in s.get_inputs()}}
        return s.run(["logits"], f, ro)[0]

    merged, unmerged = run(w("merged.onnx")), run(w("unmerged.onnx"))
    adapted, plain = run(w("inputs.onnx"), w("policy.onnx_adapter")), run(w("inputs.onnx"))
    base = E.load_pretrained(a.hf_model, "float32", a.gguf_file)
    with torch.no_grad():
        base_logits = base(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        peft_model = PeftModel.from_pretrained(base, w("peft")).eval()
        peft_logits = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        # PEFT's own merge (W + B·A·scale folded in float32), the like-for-like peer of export --merge
        peft_merged = peft_model.merge_and_unload()
        peft_merged_logits = peft_merged(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    m = mask.astype(bool)
    d = lambda x, y: float(np.abs(x[m] - y[m]).max())
    scale = max(1.0, float(np.abs(peft_logits[m]).max()))
    report = {
        "max |logit|": scale,
        "merged vs unmerged": d(merged, unmerged),
        "adapter file vs unmerged": d(adapted, unmerged),
        "adapter-input model without adapter vs transformers base": d(plain, base_logits),
        "transformers+PEFT vs merged": d(peft_logits, merged),
        "transformers+PEFT vs unmerged": d(peft_logits, unmerged),
        "PEFT merge_and_unload vs merged": d(peft_merged_logits, merged),
        "PEFT merge_and_unload vs PEFT unmerged": d(peft_merged_logits, peft_logits),
        "adapters move the logits by (PEFT vs base)": d(peft_logits, base_logits),
        "onnx_adapter bytes": os.path.getsize(w("policy.onnx_adapter")),
        "adapter_model.safetensors bytes": os.path.getsize(w("peft", "adapter_model.safetensors")),
    }
    print(json.dumps(report, indent=1))
    ok = (report["merged vs unmerged"] <= 1e-5 * scale and report["adapter file vs unmerged"] <= 1e-5 * scale
          and report["transformers+PEFT vs merged"] <= 1e-4 * scale and report["transformers+PEFT vs unmerged"] <= 1e-4 * scale)
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
