#!/usr/bin/env python3
"""Reference values for `betadpo export --hf` (tests/hf_export.rs), per tiny fixture family:
what transformers itself writes and computes, so the test needs neither torch nor transformers.

  hf_reference.json         config.json as save_pretrained writes it; every checkpoint tensor's name,
                            shape, dtype and the SHA-256 of its little-endian bytes, unchanged and after
                            the deterministic perturbation below
  hf_reference.safetensors  input_ids, attention_mask [2, 9] (row 1 right-padded by 3); transformers'
                            logits and lm_head input ("hidden") of AutoModelForCausalLM.from_pretrained on
                            the saved checkpoint, unchanged and perturbed ("logits_perturbed",
                            "hidden_perturbed"); for tensors the exporter stored with an offset (Gemma's
                            1 + w norms) their values, "checkpoint/<name>" and "perturbed/<name>"

Perturbation (reproducible bit for bit in float32 by any language): element k (flat index in the
checkpoint's layout) of every checkpoint tensor gets + float32((k * 7919) % 2001 - 1000) * float32(1e-5).

Usage: python scripts/make_hf_reference.py gpt2 llama qwen2 gemma   (the fixture must have hf_export.json)
"""
import hashlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import export_hf  # noqa: E402

FIXTURES = os.path.normpath(os.path.join(HERE, "..", "tests", "fixtures", "models"))


def perturbation(n):
    k = np.arange(n, dtype=np.int64)
    return ((k * 7919) % 2001 - 1000).astype(np.float32) * np.float32(1e-5)


def sha256(t):
    return hashlib.sha256(np.ascontiguousarray(t.numpy()).astype("<f4").tobytes()).hexdigest()


def forward(d, ids, mask):
    """transformers' logits and lm_head input for the checkpoint directory d."""
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(d).eval()
    seen = {}
    hook = m.get_output_embeddings().register_forward_pre_hook(lambda mod, a: seen.update(h=a[0]))
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=mask).logits
    hook.remove()
    return logits.float().contiguous(), seen["h"].float().contiguous()


def reference(family):
    from safetensors.torch import load_file, save_file
    import transformers
    out = os.path.join(FIXTURES, family)
    hf_map = json.load(open(os.path.join(out, export_hf.HF_MAP_FILE), encoding="utf-8"))
    offsets = {t["name"] for t in hf_map["tensors"] if "offset" in t}
    model = export_hf.build_tiny(family, export_hf.tiny_seed(family, 0), "float32")
    ids, mask = export_hf.example_inputs(model.config.get_text_config().vocab_size, batch=2, seq=9, seed=3)
    tensors = {"input_ids": ids, "attention_mask": mask}
    with tempfile.TemporaryDirectory() as tmp:
        plain, moved = os.path.join(tmp, "plain"), os.path.join(tmp, "perturbed")
        model.save_pretrained(plain)
        ckpt = load_file(os.path.join(plain, "model.safetensors"))
        perturbed = {n: (t.numpy() + perturbation(t.numel()).reshape(t.shape)) for n, t in ckpt.items()}
        perturbed = {n: torch.from_numpy(v.astype(np.float32)) for n, v in perturbed.items()}
        shutil.copytree(plain, moved, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(perturbed, os.path.join(moved, "model.safetensors"), metadata={"format": "pt"})
        tensors["logits"], tensors["hidden"] = forward(plain, ids, mask)
        tensors["logits_perturbed"], tensors["hidden_perturbed"] = forward(moved, ids, mask)
        config = json.load(open(os.path.join(plain, "config.json"), encoding="utf-8"))
    listing = []
    for n in sorted(ckpt):
        t = ckpt[n]
        if t.dtype != torch.float32:
            raise SystemExit(f"{family}: {n} is {t.dtype}; the reference expects float32 checkpoints")
        listing.append({"name": n, "shape": list(t.shape), "dtype": "F32", "sha256": sha256(t),
                        "sha256_perturbed": sha256(perturbed[n])})
        if n in offsets:
            tensors["checkpoint/" + n] = t.contiguous()
            tensors["perturbed/" + n] = perturbed[n].contiguous()
    save_file(tensors, os.path.join(out, "hf_reference.safetensors"))
    os.chmod(os.path.join(out, "hf_reference.safetensors"), 0o644)
    meta = {
        "about": "what transformers writes and computes for this fixture; see scripts/make_hf_reference.py",
        "perturbation": "element k (flat, checkpoint layout) + float32((k * 7919) % 2001 - 1000) * float32(1e-5)",
        "config": config,
        "tensors": listing,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    with open(os.path.join(out, "hf_reference.json"), "w", encoding="utf-8", newline="\n") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"{family}: {len(listing)} checkpoint tensors ({len(offsets)} with offsets); logits "
          f"{list(tensors['logits'].shape)}", flush=True)


def main():
    families = sys.argv[1:]
    if not families:
        raise SystemExit(__doc__)
    torch.set_num_threads(2)
    for f in families:
        reference(f)


if __name__ == "__main__":
    main()
