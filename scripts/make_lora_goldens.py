#!/usr/bin/env python3
"""LoRA goldens: PyTorch + PEFT autograd on the shared fixture models, for tests/lora.rs.

For each shared fixture (tiny-gpt2-ts, tiny-llama-dynamo) this rebuilds the transformers model with the
ONNX fixture's weights (golden.json's `initializer_to_parameter`), wraps it with PEFT LoRA (rank 4,
alpha 8, no dropout) on every Linear/Conv1D inside the transformer blocks (q/k/v/o and gate/up/down;
GPT-2's c_attn, attn.c_proj, c_fc, mlp.c_proj: betadpo's default targets), sets every lora_A AND lora_B
to seeded random non-zero values (so both gradients are non-zero), and computes in float64 the DPO loss
of the existing goldens: the golden batch and reference log-probs of golden.safetensors, and the golden
beta head reading the raw final hidden state (the lm_head's input).

It writes tests/fixtures/lora/<family>.safetensors (float32) with, under PEFT's state-dict names
(`base_model.model.<module>.lora_A.weight`, [r, in]; `lora_B.weight`, [out, r]):
  <name>                        the adapter values fed to the model
  grad/<name>                   d loss / d value
  loss, policy_logps, grad/beta_head.weight, grad/beta_head.bias
and <family>.json: rank, alpha, the ONNX base-weight initializer -> PEFT module map, and the loss.

Before setting the adapters it checks that the rebuilt model with PEFT's own init (B = 0) reproduces the
shared golden's loss, so the rebuild is the fixture's model.

  scripts/.venv/bin/python scripts/make_lora_goldens.py [--shared ../shared/fixtures] [--out tests/fixtures/lora]
"""
import argparse
import json
import os
import sys

import numpy as np
import onnx
import torch
from onnx import numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_hf as E  # noqa: E402
from check_golden_vs_shared import configs  # noqa: E402

RANK, ALPHA, SEED = 4, 8, 1234
FAMILIES = ["tiny-gpt2-ts", "tiny-llama-dynamo"]


def block_projections(model):
    """Names of the Linear/Conv1D modules inside the transformer blocks (not the embedding or lm_head)."""
    from transformers.pytorch_utils import Conv1D
    blocks = (".h.", ".layers.")
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and any(b in f".{n}" for b in blocks)]


def make_one(shared, family, out_dir):
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file, save_file
    from transformers import AutoModelForCausalLM

    d = os.path.join(shared, family)
    meta = json.load(open(os.path.join(d, "golden.json")))
    golden = load_file(os.path.join(d, "golden.safetensors"))
    model = AutoModelForCausalLM.from_config(configs(d, family), attn_implementation="eager").eval()
    proto = onnx.load(os.path.join(d, "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t, base_dir=d) for t in proto.graph.initializer}
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for iname, m in meta["initializer_to_parameter"].items():
            a = torch.from_numpy(inits[iname].copy())
            params[m["parameter"]].copy_(a.t() if m["transposed"] else a)

    targets = block_projections(model)
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets, bias="none",
                     fan_in_fan_out=(family == "tiny-gpt2-ts"))
    peft_model = get_peft_model(model, cfg).to(torch.float64).eval()

    ids = torch.from_numpy(golden["input_ids"])
    mask = torch.from_numpy(golden["attention_mask"])
    loss_mask = torch.from_numpy(golden["loss_mask"]).double()
    prompt_last = torch.from_numpy(golden["prompt_last_index"])
    seq_last = torch.from_numpy(golden["sequence_last_index"])
    ref = torch.from_numpy(golden["ref_logps"]).double()
    w = torch.from_numpy(golden["beta_head.weight"]).double().requires_grad_(True)
    b = torch.from_numpy(golden["beta_head.bias"]).double().requires_grad_(True)

    def loss_of():
        captured = {}
        lm_head = peft_model.get_output_embeddings()
        h = lm_head.register_forward_pre_hook(lambda mod, args: captured.__setitem__("hidden", args[0]))
        logits = peft_model(input_ids=ids, attention_mask=mask, use_cache=False, return_dict=True).logits
        h.remove()
        policy, _, loss, *_ = E.dpo_losses(logits, captured["hidden"], ids, loss_mask, prompt_last, seq_last, w, b, ref)
        return policy, loss

    with torch.no_grad():
        _, base_loss = loss_of()
    want = float(golden["loss"].reshape(()))
    if abs(base_loss.item() - want) > 1e-5 * abs(want):
        raise SystemExit(f"{family}: the rebuilt model's loss {base_loss.item()} is not the golden's {want}")

    # seeded non-zero adapters: A like PEFT's init (U(-1/sqrt(in), 1/sqrt(in))), B of a similar size
    g = torch.Generator().manual_seed(SEED)
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in sorted(lora.items()):
            bound = 1.0 / np.sqrt(p.shape[1]) if "lora_A" in n else 0.3
            p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)
    policy, loss = loss_of()
    names = sorted(lora)
    grads = torch.autograd.grad(loss, [lora[n] for n in names] + [w, b])

    f32 = lambda t: t.detach().to(torch.float32).numpy().copy()
    tensors = {"loss": f32(loss.reshape(1)), "policy_logps": f32(policy),
               "grad/beta_head.weight": f32(grads[-2]), "grad/beta_head.bias": f32(grads[-1])}
    for n, gr in zip(names, grads):
        key = n.replace(".default.", ".")  # PEFT's saved names drop the adapter name
        tensors[key] = f32(lora[n])
        tensors["grad/" + key] = f32(gr)

    param_to_init = {m["parameter"]: i for i, m in meta["initializer_to_parameter"].items()}
    modules = {}
    for t in targets:
        iname = param_to_init[t + ".weight"]
        modules[iname] = {"module": t, "peft_prefix": f"base_model.model.{t}",
                          "onnx_weight_transposed": meta["initializer_to_parameter"][iname]["transposed"]}
    import peft
    import transformers
    info = {
        "family": family, "rank": RANK, "alpha": ALPHA, "dropout": 0.0, "seed": SEED,
        "loss": loss.item(), "base_loss": base_loss.item(),
        "modules": modules,
        "tensors": "PEFT orientation: lora_A.weight [r, in], lora_B.weight [out, r]; grad/<name> = d loss / d <name>",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    os.makedirs(out_dir, exist_ok=True)
    save_file(dict(sorted(tensors.items())), os.path.join(out_dir, f"{family}.safetensors"))
    with open(os.path.join(out_dir, f"{family}.json"), "w", encoding="utf-8", newline="\n") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    print(f"{family}: {len(targets)} adapted modules, loss {loss.item():.6f} (base {base_loss.item():.6f})")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.path.normpath(os.path.join(here, "..", "..", "shared", "fixtures")))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "lora"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    for family in FAMILIES:
        make_one(args.shared, family, args.out)


if __name__ == "__main__":
    main()
