#!/usr/bin/env python3
"""Logits of the graph betadpo writes from a Hugging Face folder against transformers' on the same folder
(docs/hf-import.md): build-graph --model FOLDER, export --artifacts (the untrained policy, what
`betadpo infer` runs), onnxruntime on a right-padded batch of prompts vs
AutoModelForCausalLM.from_pretrained(FOLDER) in float32. Prints the max |difference| on the real tokens and
the relative error (norm of the difference over the norm of transformers' logits); exits non-zero above 1e-5.

  scripts/.venv/bin/python scripts/experiments/check_hf_import_logits.py --folder /tmp/SmolLM2-135M-Instruct
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
    ap.add_argument("--folder", required=True)
    ap.add_argument("--work", default="/tmp/hf-import-logits")
    ap.add_argument("--betadpo", default=os.path.join(ROOT, "target/release/betadpo"))
    a = ap.parse_args()
    folder = os.path.realpath(a.folder)
    w = lambda *p: os.path.join(a.work, *p)
    subprocess.run(["rm", "-rf", a.work])
    os.makedirs(a.work)
    sh(a.betadpo, "build-graph", "--model", folder, "--out", w("art"), "-q")
    sh(a.betadpo, "export", "--artifacts", w("art"), "--out", w("policy.onnx"))

    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    ids, mask = prompt_batch(Tokenizer.from_file(os.path.join(folder, "tokenizer.json")))
    pos = np.tile(np.arange(ids.shape[1], dtype=np.int64), (ids.shape[0], 1))
    s = ort.InferenceSession(w("policy.onnx"), providers=["CPUExecutionProvider"])
    feeds = {k: v for k, v in {"input_ids": ids, "attention_mask": mask, "position_ids": pos}.items() if k in {i.name for i in s.get_inputs()}}
    ours = s.run(["logits"], feeds)[0]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    m = mask.astype(bool)
    diff = ours[m].astype(np.float64) - theirs[m]
    report = {
        "folder": folder,
        "max |logit|": float(np.abs(theirs[m]).max()),
        "max |difference|": float(np.abs(diff).max()),
        "relative (norm of difference / norm)": float(np.linalg.norm(diff) / np.linalg.norm(theirs[m])),
    }
    print(json.dumps(report, indent=1))
    ok = report["relative (norm of difference / norm)"] <= 1e-5
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
