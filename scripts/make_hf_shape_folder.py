#!/usr/bin/env python3
"""A Hugging Face folder of a real model's shape with random weights (`save_pretrained`: config.json,
generation_config.json, model.safetensors, sharded above 5 GB), plus the quickstart tokenizer files, for
measuring `build-graph --model FOLDER` when the real weights cannot be downloaded (docs/hf-import.md).

  scripts/.venv/bin/python scripts/make_hf_shape_folder.py --shape smollm2-135m --dtype bfloat16 --out /tmp/smollm2
Shapes: smollm2-135m (HuggingFaceTB/SmolLM2-135M-Instruct's config.json) and export_hf.py's SHAPES
(llama-3.2-1b, llama-3.2-3b, ...).
"""
import argparse
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import export_hf  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_parameters=dict(rope_type="default", rope_theta=100000.0), tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", required=True)
    ap.add_argument("--dtype", choices=sorted(export_hf.DTYPES), default="float32")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from transformers import AutoConfig
    if a.shape == "smollm2-135m":
        config = AutoConfig.for_model("llama", **SMOLLM2_135M)
    else:
        config = export_hf.shape_config(a.shape)
    model = export_hf.build_random(config, a.seed, a.dtype)
    shutil.rmtree(a.out, ignore_errors=True)
    model.save_pretrained(a.out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(export_hf.QUICKSTART, f), os.path.join(a.out, f))
    size = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out) if f.endswith(".safetensors"))
    print(f"{a.out}: {a.shape} {a.dtype}, {size} bytes of safetensors")


if __name__ == "__main__":
    main()
