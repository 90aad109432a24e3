#!/usr/bin/env python3
"""Fixtures of `build-graph --model <Hugging Face folder>` (tests/hf_import.rs): for each family a tiny
random transformers model saved with `save_pretrained` (config.json, generation_config.json,
model.safetensors) under tests/fixtures/hf/<family>/, and golden.safetensors computed from it by PyTorch
in float64, in the layout of tests/fixtures/models/README.md, except that every gradient is keyed by the
checkpoint tensor's own name (`grad/model.layers.0.self_attn.q_proj.weight`, never transposed; a tied
weight's gradient is the sum over its uses). The llama folder also gets the quickstart tokenizer files,
so the folder is complete (build-graph → train without --tokenizer).

Each family's config exercises what sets it apart: llama (llama3 rope scaling, GQA, tied embeddings,
rms_norm_eps), mistral (a sliding window of 16: shorter than the batch, longer than its padding (transformers gives NaN on rows whose window holds only padding)), qwen2 (q/k/v biases, tied),
qwen3 (q/k norms, head_dim 32 != hidden/heads), gemma (1 + w norms, scaled
embeddings, multi-query attention), gemma2 (1 + w norms, scaled embeddings, pre/post norms,
attention and final soft-capping, alternating sliding windows), phi3 (fused qkv and gate_up), gpt2.

Usage: scripts/.venv/bin/python scripts/make_hf_import_fixtures.py [family ...]
"""
import json
import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import export_hf  # noqa: E402

ROOT = os.path.normpath(os.path.join(HERE, ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "hf")
QUICKSTART = os.path.join(ROOT, "graphs", "quickstart")

_COMMON = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
FAMILIES = {
    "llama": dict(_COMMON, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=True,
                  rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=64)),
    "mistral": dict(_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=16, tie_word_embeddings=False),
    "qwen2": dict(_COMMON, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(_COMMON, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    "gemma": dict(_COMMON, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, pad_token_id=None),
    "gemma2": dict(_COMMON, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=16,
                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0, tie_word_embeddings=True,
                   pad_token_id=None),
    "phi3": dict(_COMMON, num_key_value_heads=2, original_max_position_embeddings=128, pad_token_id=None,
                 tie_word_embeddings=False),
    "gpt2": dict(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4, n_inner=128, bos_token_id=0,
                 eos_token_id=0, tie_word_embeddings=True),
}


def checkpoint_names(folder):
    from safetensors import safe_open
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return list(f.keys())


def goldens(model, names, ids, mask, loss_mask, prompt_last, seq_last):
    """The golden tensors: logits, hidden, DPO losses, and gradients by checkpoint name."""
    m64 = export_hf.copy.deepcopy(model).to(torch.float64).eval()
    groups = export_hf.tied_groups(m64)
    export_hf.untie(m64)
    for mod in m64.modules():
        if isinstance(mod, torch.nn.Embedding):
            mod.padding_idx = None
    captured = {}
    hook = m64.get_output_embeddings().register_forward_pre_hook(lambda mod, a: captured.__setitem__("h", a[0]))
    logits = export_hf.LogitsOnly(m64)(ids, mask)
    hook.remove()
    hidden = captured["h"]
    w, b = export_hf.beta_head(hidden.shape[-1])
    w.requires_grad_(True)
    b.requires_grad_(True)
    with torch.no_grad():
        logp0 = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        ref = (logp0 * loss_mask[:, 1:].double()).sum(1) + torch.linspace(-1.0, 1.0, ids.shape[0], dtype=torch.float64)
    policy, beta, loss, beta_seq, loss_seq, loss_fixed = export_hf.dpo_losses(
        logits, hidden, ids, loss_mask.double(), prompt_last, seq_last, w, b, ref)
    params = dict(m64.named_parameters())
    plist = list(params.values())
    g_loss = torch.autograd.grad(loss, plist + [w, b], retain_graph=True, allow_unused=True)
    g_seq = torch.autograd.grad(loss_seq, [w, b], retain_graph=True)
    g_fixed = torch.autograd.grad(loss_fixed, plist, retain_graph=True, allow_unused=True)

    def by_checkpoint_name(grads):
        by_param = {n: (g if g is not None else torch.zeros_like(params[n])) for n, g in zip(params, grads)}
        out = {}
        for name in names:
            uses = next((g for g in groups if name in g), [name])
            out[name] = sum(by_param[u] for u in uses)
        return out

    f32 = lambda t: t.detach().to(torch.float32).contiguous()
    t = {
        "input_ids": ids, "attention_mask": mask, "position_ids": torch.arange(ids.shape[1]).expand_as(ids).contiguous(),
        "loss_mask": loss_mask, "prompt_last_index": prompt_last, "sequence_last_index": seq_last,
        "logits": f32(logits), "hidden": f32(hidden), "policy_logps": f32(policy), "ref_logps": f32(ref),
        "beta_head.weight": f32(w), "beta_head.bias": f32(b), "beta": f32(beta), "loss": f32(loss.reshape(1)),
        "grad/beta_head.weight": f32(g_loss[-2]), "grad/beta_head.bias": f32(g_loss[-1]),
        "beta_sequence": f32(beta_seq), "loss_sequence": f32(loss_seq.reshape(1)),
        "grad_sequence/beta_head.weight": f32(g_seq[0]), "grad_sequence/beta_head.bias": f32(g_seq[1]),
        "loss_fixed_beta": f32(loss_fixed.reshape(1)),
    }
    for name, g in by_checkpoint_name(g_loss[: len(plist)]).items():
        t["grad/" + name] = f32(g)
    for name, g in by_checkpoint_name(g_fixed).items():
        t["grad_fixed_beta/" + name] = f32(g)
    return t


def make(family):
    from transformers import AutoConfig
    from safetensors.torch import save_file
    config = AutoConfig.for_model(family, **FAMILIES[family])
    seed = 100 + sorted(FAMILIES).index(family)
    model = export_hf.build_random(config, seed, "float32")
    folder = os.path.join(OUT, family)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    if family == "llama":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(QUICKSTART, f), os.path.join(folder, f))
    tok, eos_id, pad_id = export_hf.load_tokenizer(os.path.join(QUICKSTART, "tokenizer.json"))
    with open(os.path.join(QUICKSTART, "test.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][:4]
    ids, mask, loss_mask, prompt_last, seq_last = export_hf.make_batch(tok, eos_id, pad_id, rows)
    tensors = goldens(model, checkpoint_names(folder), ids, mask, loss_mask, prompt_last, seq_last)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, os.path.join(folder, "golden.safetensors"))
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(f"{family}: loss {tensors['loss'].item():.6f}, {len(checkpoint_names(folder))} tensors, {size / 1e6:.2f} MB", flush=True)


def main():
    families = sys.argv[1:] or list(FAMILIES)
    for f in families:
        if f not in FAMILIES:
            raise SystemExit(f"unknown family {f!r}; known: {', '.join(FAMILIES)}")
        make(f)


if __name__ == "__main__":
    main()
