#!/usr/bin/env python3
"""Golden values for epsilon-DPO (tests/epsilon_dpo.rs), computed in float64 by PyTorch with the formulas
of the authors' reference code (oddqueue/e-dpo, trainer.py: `concatenated_forward`'s epsilon steps and
`dpo_loss`), on the shared fixture tiny-llama-dynamo and its golden batch (../shared/fixtures).

  reference  the fixture model as exported (what build-graph freezes into the train graph's reference copy)
  policy     the same model with every parameter initializer perturbed, element k (flat index in the ONNX
             initializer's layout) + float32((k * 7919) % 2001 - 1000) * float32(SCALE / 1000), computed in
             float32 so the test can feed the same values bit for bit
  ref_logps  the reference model's answer log-probs on the batch (what `train` precomputes)

Written to tests/fixtures/epsilon_dpo/golden.safetensors (float32 unless noted):

  settings            [beta, epsilon, scale]
  ref_logps [8], policy_logps [8]
  logratios, p_epsilon_logratios, n_epsilon_logratios [4]   chosen minus rejected log-prob of the policy and the
                      two perturbed policies (logits (1 + eps) z - eps z_ref and (1 - eps) z + eps z_ref)
  steps [4]           +1 where p > logratio > n, -1 where n > logratio > p, else 0
  beta [4]            beta / (1 + eps steps);  beta_next [1]: beta / (1 + eps mean(steps))
  loss []             mean -logsigmoid(beta_i ((pc - rc) - (pr - rr))), the betas detached
  grad/<init>         d loss / d initializer, for the small initializers (<= 2048 elements: norms, k and v projections)
  grad_dot/<init>     sum(grad * pattern) for every parameter initializer, pattern_k = ((k * 7919) % 2001 - 1000) / 1000
  grad_norm/<init>    |grad|

Usage: scripts/.venv/bin/python scripts/make_epsilon_dpo_golden.py [--shared ../shared/fixtures]
"""
import argparse
import json
import os
import sys

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import check_golden_vs_shared as C  # noqa: E402

NAME = "tiny-llama-dynamo"
BETA = 0.1
# Chosen so that the four pairs step +1, -1 and 0 (printed; the script refuses a near-tie).
EPSILON = 0.5
SCALE = 0.3
SMALL = 2048


def pattern(n):
    k = np.arange(n, dtype=np.int64)
    return ((k * 7919) % 2001 - 1000).astype(np.float32)


def sequence_logps(logits, ids, loss_mask):
    """The reference code's per-token log-probs (labels and mask rolled left), summed per row."""
    labels = torch.roll(ids, shifts=-1, dims=1)
    mask = torch.roll(loss_mask, shifts=-1, dims=1).bool()
    labels = labels.masked_fill(~mask, 0)
    tok = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    return (tok * mask).sum(-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.path.normpath(os.path.join(HERE, "..", "..", "shared", "fixtures")))
    ap.add_argument("--out", default=os.path.normpath(os.path.join(HERE, "..", "tests", "fixtures", "epsilon_dpo")))
    ap.add_argument("--epsilon", type=float, default=EPSILON)
    ap.add_argument("--scale", type=float, default=SCALE)
    a = ap.parse_args()
    eps, scale = a.epsilon, a.scale
    from safetensors.numpy import load_file, save_file
    torch.set_num_threads(2)
    d = os.path.join(a.shared, NAME)
    meta = json.load(open(os.path.join(d, "golden.json")))
    g = load_file(os.path.join(d, "golden.safetensors"))
    proto = onnx.load(os.path.join(d, "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t, base_dir=d) for t in proto.graph.initializer}
    step = np.float32(scale / 1000)
    moved = dict(inits)
    for name in meta["initializer_to_parameter"]:
        w = inits[name]
        moved[name] = (w.reshape(-1) + pattern(w.size) * step).astype(np.float32).reshape(w.shape)

    ids = torch.from_numpy(g["input_ids"])
    attn = torch.from_numpy(g["attention_mask"])
    loss_mask = torch.from_numpy(g["loss_mask"]).double()
    reference = C.torch_model(d, NAME).double()
    policy = C.torch_model(d, NAME, moved).double()
    with torch.no_grad():
        z_ref = reference(input_ids=ids, attention_mask=attn).logits
    ref_logps = sequence_logps(z_ref, ids, loss_mask)

    params = dict(policy.named_parameters(remove_duplicate=False))
    z = policy(input_ids=ids, attention_mask=attn).logits
    logps = sequence_logps(z, ids, loss_mask)
    b = logps.shape[0] // 2
    with torch.no_grad():
        zd = z.detach()
        p_logps = sequence_logps((1 + eps) * zd - eps * z_ref, ids, loss_mask)
        n_logps = sequence_logps((1 - eps) * zd + eps * z_ref, ids, loss_mask)
        lr = logps[:b] - logps[b:]
        lr_p = p_logps[:b] - p_logps[b:]
        lr_n = n_logps[:b] - n_logps[b:]
        steps = ((lr_p > lr) & (lr > lr_n)).double() - ((lr_n > lr) & (lr > lr_p)).double()
        beta = BETA / (1 + eps * steps)
        beta_next = BETA / (1 + eps * steps.mean())
    u = (logps[:b] - ref_logps[:b]) - (logps[b:] - ref_logps[b:])
    loss = -F.logsigmoid(beta * u).mean()
    loss.backward()

    # float32 on ONNX Runtime must take the same decisions: every comparison clear of rounding
    gaps = torch.stack([(lr_p - lr).abs(), (lr - lr_n).abs(), (lr_p - lr_n).abs()]).min(0).values
    print(f"steps {steps.tolist()}  decision gaps {gaps.tolist()}")
    print(f"logratios {lr.tolist()}\n  p {lr_p.tolist()}\n  n {lr_n.tolist()}")
    print(f"beta {beta.tolist()} next {float(beta_next)} loss {float(loss.detach())}")
    if float(gaps.min()) < 1e-3:
        sys.exit("a step decision is within 1e-3 of a tie: choose another --scale or --epsilon")

    f32 = lambda t: np.ascontiguousarray(t.detach().numpy().astype(np.float32))  # noqa: E731
    out = {
        "settings": np.array([BETA, eps, scale], dtype=np.float32),
        "ref_logps": f32(ref_logps),
        "policy_logps": f32(logps),
        "logratios": f32(lr),
        "p_epsilon_logratios": f32(lr_p),
        "n_epsilon_logratios": f32(lr_n),
        "steps": f32(steps),
        "beta": f32(beta),
        "beta_next": f32(beta_next.reshape(1)),
        "loss": f32(loss),
    }
    for iname, m in meta["initializer_to_parameter"].items():
        grad = params[m["parameter"]].grad
        grad = (grad.t() if m["transposed"] else grad).contiguous()
        flat = grad.reshape(-1).numpy()
        out[f"grad_norm/{iname}"] = np.array(np.linalg.norm(flat), dtype=np.float32)
        out[f"grad_dot/{iname}"] = np.array(flat @ (pattern(flat.size).astype(np.float64) / 1000), dtype=np.float32)
        if flat.size <= SMALL:
            out[f"grad/{iname}"] = f32(grad)
    os.makedirs(a.out, exist_ok=True)
    save_file(out, os.path.join(a.out, "golden.safetensors"))
    print(f"wrote {os.path.join(a.out, 'golden.safetensors')} ({len(out)} tensors)")


if __name__ == "__main__":
    main()
