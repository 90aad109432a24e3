#!/usr/bin/env python3
"""The two Python steps of scripts/make_optimum_fixtures.sh (which runs Optimum's exporter in between).

  save    --family F --out DIR                a tiny random model of family F (export_hf.py's configs and
                                              seeds), written with save_pretrained: what optimum-cli reads
  golden  --hf-dir DIR --out FIXTURE --exporter TEXT
                                              FIXTURE/model.onnx (an Optimum export of DIR) against PyTorch:
                                              logits checked on padded batches, then golden.safetensors and
                                              golden.json exactly as export_hf.py --golden writes them

Run it with the Optimum virtual environment's Python (its transformers is older than scripts/.venv's, and
the model must be read by the transformers that wrote it). Everything else is export_hf.py's code: the
graph's extra inputs (position_ids, an empty past, use_cache_branch) are fed by lm_feeds.py.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import export_hf  # noqa: E402


def save(family, out):
    model = export_hf.build_tiny(family, export_hf.tiny_seed(family, 0), "float32")
    model.save_pretrained(out)
    export_hf.log(f"saved tiny random {family} ({sum(p.numel() for p in model.parameters()):,} parameters) to {out}")


def golden(hf_dir, out, exporter, test_jsonl, tokenizer, family):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    path = os.path.join(out, "model.onnx")
    vocab = model.config.get_text_config().vocab_size
    tok, eos_id, pad_id = export_hf.load_tokenizer(tokenizer)
    rows = [json.loads(l) for l in open(test_jsonl, encoding="utf-8") if l.strip()][:4]
    batches = [export_hf.make_batch(tok, eos_id, pad_id, rows)[:2],
               export_hf.example_inputs(vocab, batch=3, seq=13, seed=1),
               export_hf.example_inputs(vocab, batch=1, seq=5, seed=2)]
    export_hf.verify(model, path, batches, 1e-4)
    source = (f"tiny random {family} (scripts/optimum_fixtures.py save --family {family}, i.e. export_hf.py's "
              f"--tiny {family} --seed 0), exported by scripts/make_optimum_fixtures.sh")
    export_hf.golden(model, path, exporter, test_jsonl, tokenizer, 4, source, check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save")
    s.add_argument("--family", required=True, choices=sorted(export_hf.TINY_FAMILIES))
    s.add_argument("--out", required=True)
    g = sub.add_parser("golden")
    g.add_argument("--hf-dir", required=True)
    g.add_argument("--family", required=True)
    g.add_argument("--out", required=True, help="fixture directory holding model.onnx")
    g.add_argument("--exporter", required=True, help="how model.onnx was made (golden.json's `exporter`)")
    g.add_argument("--test-jsonl", default=os.path.join(export_hf.QUICKSTART, "test.jsonl"))
    g.add_argument("--tokenizer", default=os.path.join(export_hf.QUICKSTART, "tokenizer.json"))
    args = ap.parse_args()
    if args.cmd == "save":
        save(args.family, args.out)
    else:
        golden(args.hf_dir, args.out, args.exporter, args.test_jsonl, args.tokenizer, args.family)


if __name__ == "__main__":
    main()
