#!/usr/bin/env python3
"""Check the committed model fixtures without torch: onnxruntime + numpy + safetensors only.

For every tests/fixtures/models/<family>/ (and any directory given on the command line) this runs
model.onnx on the golden batch with onnxruntime and recomputes, in float64 numpy from the ONNX outputs,
the logits, hidden state (the lm_head MatMul's input), policy log-probs, betas and the three losses, and
compares them with golden.safetensors. It also checks that golden.json's mapping names real initializers
with the right shapes and that every gradient tensor has its initializer's shape.

  python scripts/verify_fixtures.py [DIR ...]
Exit code 0 when everything agrees; prints one line per fixture.
"""
import copy
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from safetensors.numpy import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lm_feeds import lm_feeds  # noqa: E402

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def softplus(x):
    return np.logaddexp(0.0, x)


def neg_logsigmoid(x):
    return np.logaddexp(0.0, -x)


def branch_without_cache(proto):
    """A merged decoder (Hugging Face Optimum: one If on use_cache_branch) as its else_branch, the graph
    without a cache, so that the lm_head's input is a main-graph tensor. Other graphs as they are."""
    nodes = proto.graph.node
    if len(nodes) != 1 or nodes[0].op_type != "If" or nodes[0].input[0] != "use_cache_branch":
        return proto
    branch = next(a.g for a in nodes[0].attribute if a.name == "else_branch")
    if [o.name for o in branch.output] != list(nodes[0].output):
        raise SystemExit("the merged decoder's else_branch outputs are not named like its If's")
    p = copy.deepcopy(proto)
    del p.graph.node[:]
    p.graph.node.extend(branch.node)
    p.graph.initializer.extend(branch.initializer)
    return p


def hidden_name(proto, mapping):
    cons = {}
    for node in proto.graph.node:
        for i in node.input:
            cons.setdefault(i, []).append(node)
    lm = [i for i, m in mapping.items()
          if m["parameter"].endswith("lm_head.weight") or any(u.endswith("lm_head.weight") for u in m.get("tied_uses", []))]
    for name in lm:
        frontier = [name]
        for _ in range(3):
            nxt = []
            for f in frontier:
                for node in cons.get(f, []):
                    if node.op_type in ("MatMul", "Gemm"):
                        return [x for x in node.input[:2] if x != f][0]
                    if node.op_type in ("Transpose", "Identity", "Cast"):
                        nxt.append(node.output[0])
            frontier = nxt
    return None


def check(d):
    g = load_file(os.path.join(d, "golden.safetensors"))
    meta = json.load(open(os.path.join(d, "golden.json")))
    proto = branch_without_cache(onnx.load(os.path.join(d, "model.onnx")))
    problems = []
    inits = {t.name: t for t in proto.graph.initializer}
    for iname, m in meta["initializer_to_parameter"].items():
        if iname not in inits:
            problems.append(f"mapping names missing initializer {iname}")
            continue
        shape = tuple(inits[iname].dims)
        for prefix in ("grad/", "grad_fixed_beta/"):
            if prefix + iname not in g:
                problems.append(f"no {prefix}{iname}")
            elif g[prefix + iname].shape != shape:
                problems.append(f"{prefix}{iname} has shape {g[prefix + iname].shape}, initializer {shape}")
    for n in meta["non_parameter_float_initializers"]:
        if n not in inits:
            problems.append(f"non-parameter initializer {n} not in the graph")
    hname = hidden_name(proto, meta["initializer_to_parameter"])
    p = copy.deepcopy(proto)
    outs = ["logits"]
    if hname:
        p.graph.output.append(onnx.helper.make_empty_tensor_value_info(hname))
        outs.append(hname)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(p.SerializeToString(), so, providers=["CPUExecutionProvider"])
    res = sess.run(outs, lm_feeds(sess, g["input_ids"], g["attention_mask"]))
    logits = res[0].astype(np.float64)
    errs = {"logits": np.abs(logits - g["logits"]).max()}
    ids, lm = g["input_ids"], g["loss_mask"].astype(np.float64)
    n = ids.shape[0] // 2
    lp = np.take_along_axis(log_softmax(logits[:, :-1]), ids[:, 1:, None], -1)[..., 0]
    policy = (lp * lm[:, 1:]).sum(1)
    ref = g["ref_logps"].astype(np.float64)
    errs["policy_logps"] = np.abs(policy - g["policy_logps"]).max()
    margin = (policy[:n] - policy[n:]) - (ref[:n] - ref[n:])
    loss_fixed = neg_logsigmoid(0.1 * margin).mean()
    errs["loss_fixed_beta"] = abs(loss_fixed - g["loss_fixed_beta"][0])
    if hname:
        hidden = res[1].astype(np.float64)
        errs["hidden"] = np.abs(hidden - g["hidden"]).max()
        w, b = g["beta_head.weight"].astype(np.float64), g["beta_head.bias"].astype(np.float64)
        beta = softplus(hidden[np.arange(n), g["prompt_last_index"]] @ w + b[0])
        errs["beta"] = np.abs(beta - g["beta"]).max()
        errs["loss"] = abs(neg_logsigmoid(beta * margin).mean() - g["loss"][0])
        bs = softplus(hidden[np.arange(2 * n), g["sequence_last_index"]] @ w + b[0])
        errs["beta_sequence"] = np.abs(bs - g["beta_sequence"]).max()
        ms = bs[:n] * (policy[:n] - ref[:n]) - bs[n:] * (policy[n:] - ref[n:])
        errs["loss_sequence"] = abs(neg_logsigmoid(ms).mean() - g["loss_sequence"][0])
    else:
        problems.append("could not find the lm_head MatMul's input")
    tol = {"logits": 1e-5, "hidden": 1e-5, "policy_logps": 1e-4}
    for k, e in errs.items():
        if not e <= tol.get(k, 1e-5):
            problems.append(f"{k} differs by {e:.3g}")
    worst = max(errs.values())
    status = "OK" if not problems else "FAILED: " + "; ".join(problems)
    print(f"{os.path.relpath(d, ROOT)}: {status} (max abs difference {worst:.3g} over {', '.join(errs)})")
    return not problems


def main():
    dirs = sys.argv[1:]
    if not dirs:
        base = os.path.join(ROOT, "tests", "fixtures", "models")
        dirs = sorted(os.path.join(base, x) for x in os.listdir(base) if os.path.isdir(os.path.join(base, x)))
    ok = all([check(d) for d in dirs])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
