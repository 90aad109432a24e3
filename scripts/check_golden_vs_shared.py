#!/usr/bin/env python3
"""Cross-check export_hf.py's golden computation against an independent oracle.

The shared fixtures (`../shared/fixtures`, when present; never needed at run time) hold two exported tiny
models with golden values produced outside this project. This script loads their ONNX weights into
same-shaped transformers models, reruns `export_hf.golden` with the fixture's beta head on the fixture's
data and tokenizer, and compares every tensor and the golden.json mapping. Exit code 0 when everything
agrees (float32 tensors to 1e-5 relative), 1 otherwise, 0 with a notice when the fixtures are absent.

  python scripts/check_golden_vs_shared.py [--shared ../shared/fixtures]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import onnx
import torch
from onnx import numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_hf as E  # noqa: E402


def configs(d, name):
    from transformers import AutoConfig
    proto = onnx.load(os.path.join(d, "model.onnx"), load_external_data=False)
    if name == "tiny-llama-dynamo":
        inv = [t for t in proto.graph.initializer if t.name.endswith("inv_freq")][0]
        inv = numpy_helper.to_array(inv, base_dir=d).astype(np.float64)
        theta = float(round(inv[1] ** (-len(inv))))  # inv_freq[i] = theta^(-2i/head_dim)
        return AutoConfig.for_model(
            "llama", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
            tie_word_embeddings=False, rope_parameters={"rope_theta": theta, "rope_type": "default"})
    if name == "tiny-gpt2-ts":
        return AutoConfig.for_model("gpt2", vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                    bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    raise KeyError(name)


def torch_model(d, name, inits=None):
    """The shared fixture `name` (directory d) as a transformers model holding its ONNX weights, or the
    initializer values `inits` (name -> array) in their place."""
    from transformers import AutoModelForCausalLM
    ref_json = json.load(open(os.path.join(d, "golden.json")))
    model = AutoModelForCausalLM.from_config(configs(d, name), attn_implementation="eager").eval()
    if inits is None:
        proto = onnx.load(os.path.join(d, "model.onnx"))
        inits = {t.name: numpy_helper.to_array(t, base_dir=d) for t in proto.graph.initializer}
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for iname, m in ref_json["initializer_to_parameter"].items():
            a = torch.from_numpy(inits[iname].copy())
            params[m["parameter"]].copy_(a.t() if m["transposed"] else a)
    return model


def check_one(shared, name):
    from safetensors.numpy import load_file
    d = os.path.join(shared, name)
    ref_json = json.load(open(os.path.join(d, "golden.json")))
    ref = load_file(os.path.join(d, "golden.safetensors"))
    model = torch_model(d, name)
    w = torch.from_numpy(ref["beta_head.weight"].astype(np.float64))
    b = torch.from_numpy(ref["beta_head.bias"].astype(np.float64))
    saved = E.beta_head
    E.beta_head = lambda hidden_size: (w.clone(), b.clone())
    ok = True
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for f in os.listdir(d):
                if f.startswith("model.onnx"):
                    shutil.copy(os.path.join(d, f), os.path.join(tmp, f))
            E.golden(model, os.path.join(tmp, "model.onnx"), ref_json["exporter"],
                     os.path.join(shared, "prefs", "test.jsonl"), os.path.join(shared, "tokenizer", "tokenizer.json"),
                     ref_json["pairs"], "shared fixture " + name, check=True)
            mine = load_file(os.path.join(tmp, "golden.safetensors"))
            mine_json = json.load(open(os.path.join(tmp, "golden.json")))
    finally:
        E.beta_head = saved
    if set(ref) != set(mine):
        print(f"  tensor names differ: only shared {sorted(set(ref) - set(mine))}, only ours {sorted(set(mine) - set(ref))}")
        ok = False
    worst = 0.0
    for k in sorted(set(ref) & set(mine)):
        a, m = ref[k], mine[k]
        if a.shape != m.shape or a.dtype != m.dtype:
            print(f"  {k}: shared {a.dtype}{list(a.shape)} ours {m.dtype}{list(m.shape)}")
            ok = False
        elif a.dtype.kind == "f":
            rel = float(np.linalg.norm(a.astype(np.float64) - m) / max(np.linalg.norm(a.astype(np.float64)), 1e-30))
            worst = max(worst, rel)
            if rel > 1e-5:
                print(f"  {k}: relative difference {rel:.3g}")
                ok = False
        elif not np.array_equal(a, m):
            print(f"  {k}: integer tensors differ")
            ok = False
    for k in ["initializer_to_parameter", "non_parameter_float_initializers", "parameters_without_initializer",
              "tied_in_pytorch", "inputs", "texts", "hidden_size", "vocab_size", "pairs", "rows"]:
        if ref_json.get(k) != mine_json.get(k):
            print(f"  golden.json[{k!r}] differs:\n    shared {ref_json.get(k)}\n    ours   {mine_json.get(k)}")
            ok = False
    print(f"{name}: {'OK' if ok else 'MISMATCH'} ({len(ref)} tensors, worst relative difference {worst:.3g})")
    return ok


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.path.normpath(os.path.join(here, "..", "..", "shared", "fixtures")))
    args = ap.parse_args()
    if not os.path.isdir(args.shared):
        print(f"skipped: no shared fixtures at {args.shared}")
        return 0
    torch.set_num_threads(2)
    ok = all([check_one(args.shared, n) for n in ["tiny-gpt2-ts", "tiny-llama-dynamo"]])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
