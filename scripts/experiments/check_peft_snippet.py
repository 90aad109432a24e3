#!/usr/bin/env python3
"""Runs the Python that `betadpo export --hf` prints, exactly as printed, in a fresh interpreter.

A tiny random Llama is saved as a Hugging Face folder (the base model a user has), exported to ONNX by
scripts/tools/export_hf.py --model FOLDER (which records the folder in hf_export.json), and then:
  * LoRA: build-graph --lora-rank 4, train 2 steps, export --run --hf DIR; the printed snippet
    (AutoPeftModelForCausalLM on DIR, whose adapter_config.json names the base folder) must load a PEFT
    model whose adapters are the trained ones (lora_B non-zero) and whose logits differ from the base's;
  * full: build-graph, export --artifacts --hf DIR (untrained, so the weights are the base's); the printed
    snippet (AutoModelForCausalLM on DIR) must load a model whose logits equal the base's.
Each snippet runs in its own `python -c` with the working directory export ran in; the check code after
it only inspects the `model` the snippet made.

Usage: scripts/.venv/bin/python scripts/experiments/check_peft_snippet.py [--betadpo target/debug/betadpo] [--work DIR]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

from betadpo_py import export_hf as E
from betadpo_py.paths import QUICKSTART, ROOT, script

MARK = "load it in Python:"

# Runs after the printed snippet, in the same interpreter: what the snippet loaded, as JSON.
INSPECT = """
import json, torch
ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
with torch.no_grad():
    logits = model(input_ids=ids).logits[0].tolist()
lora_b = [p.abs().max().item() for n, p in model.named_parameters() if "lora_B" in n]
print("INSPECT " + json.dumps({"type": type(model).__name__, "logits": logits, "lora_b": lora_b,
                               "tokenizer": "tokenizer" in globals()}))
"""


def sh(*cmd, cwd=None):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


def printed_snippet(stdout):
    lines = stdout.splitlines()
    if MARK not in lines:
        raise SystemExit(f"export printed no '{MARK}' block:\n{stdout}")
    code = []
    for line in lines[lines.index(MARK) + 1:]:
        if not line.startswith("    "):
            break
        code.append(line[4:])
    return "\n".join(code)


def run_snippet(snippet, cwd):
    out = sh(sys.executable, "-c", snippet + "\n" + INSPECT, cwd=cwd)
    found = [l for l in out.splitlines() if l.startswith("INSPECT ")]
    return json.loads(found[-1][len("INSPECT "):])


def base_logits(base_dir):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 5, 9, 13, 2, 7]])).logits[0].tolist()


def max_diff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--betadpo", default=os.path.join(ROOT, "target/debug/betadpo"))
    ap.add_argument("--work", default="/tmp/check-peft-snippet")
    a = ap.parse_args()
    b = os.path.abspath(a.betadpo)
    if os.path.exists(a.work):
        shutil.rmtree(a.work)
    os.makedirs(a.work)
    w = lambda *p: os.path.join(a.work, *p)

    model = E.build_tiny("llama", E.tiny_seed("llama", 0), "float32")
    model.save_pretrained(w("base"))
    sh(sys.executable, script("tools", "export_hf.py"), "--model", w("base"), "--out", w("onnx"))
    recorded = json.load(open(w("onnx/hf_export.json")))["source_model"]
    assert recorded == w("base"), f"hf_export.json records {recorded}, not the base folder"
    want = base_logits(w("base"))
    data = w("pairs.jsonl")
    with open(os.path.join(QUICKSTART, "train.jsonl")) as src, open(data, "w") as dst:
        dst.writelines(src.readlines()[:8])
    tok = os.path.join(QUICKSTART, "tokenizer.json")

    sh(b, "build-graph", "--model", w("onnx/model.onnx"), "--out", w("art-lora"), "--lora-rank", "4", "-q")
    sh(b, "train", "--artifacts", w("art-lora"), "--data", data, "--tokenizer", tok, "--out", w("run"),
       "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--threads", "2", "--quiet")
    out = sh(b, "export", "--run", w("run"), "--hf", "peft", cwd=a.work)
    snippet = printed_snippet(out)
    print(f"LoRA export printed:\n{snippet}")
    got = run_snippet(snippet, a.work)
    base_named = json.load(open(w("peft/adapter_config.json")))["base_model_name_or_path"]
    assert base_named == w("base"), base_named
    assert got["type"].startswith("PeftModel"), got["type"]
    assert got["lora_b"] and max(got["lora_b"]) > 0, "the trained adapters (lora_B) are zero: not loaded"
    moved = max_diff(got["logits"], want)
    assert moved > 1e-4, f"the adapted model's logits equal the base's ({moved})"
    assert got["tokenizer"], "the snippet loads the tokenizer copied beside the adapter"
    print(f"ok: {got['type']} on {base_named}; {len(got['lora_b'])} lora_B tensors, max |B| {max(got['lora_b']):.3g}; "
          f"logits moved {moved:.3g} from the base's")

    sh(b, "build-graph", "--model", w("onnx/model.onnx"), "--out", w("art-full"), "-q")
    out = sh(b, "export", "--artifacts", w("art-full"), "--hf", "full", "--tokenizer", tok, cwd=a.work)
    snippet = printed_snippet(out)
    print(f"full export printed:\n{snippet}")
    got = run_snippet(snippet, a.work)
    diff = max_diff(got["logits"], want)
    assert got["type"] == "LlamaForCausalLM", got["type"]
    assert diff < 1e-5, f"the untrained export's logits differ from the base's by {diff}"
    print(f"ok: {got['type']}; logits equal the base's (max |diff| {diff:.2g})")


if __name__ == "__main__":
    main()
