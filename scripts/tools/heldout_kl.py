#!/usr/bin/env python3
"""KL(policy || reference) per token on held-out answers, by group, from two exported models.

Both models are ONNX files with a `logits` output (`betadpo export --run RUN` for the policy,
`betadpo export --artifacts ART` for the untrained reference; LoRA runs: `--merge`). For every pair of
`--data`, each answer (chosen and rejected) is fed after its prompt, and at every answer position the
full next-token distributions of the two models are compared:

    KL_t = sum_v pi(v | x, y<t) * (log pi(v | x, y<t) - log ref(v | x, y<t))

This is the exact KL of the two next-token distributions along the held-out answers (teacher forced),
not a sampled estimate: it measures how far the policy moved where the data lies, including on tokens
the answers did not choose. Reported per group: the mean KL per answer token, the mean summed KL per
answer, and the mean |policy - reference| log-prob of an answer ("drift", the quantity `betadpo train`
evaluates as eval/drift/abs_logratio, so the two can be compared: they agree when the tokens agree).

Tokens follow betadpo (and TRL) for plain-text rows: prompt, and prompt + answer + EOS, encoded with
special tokens; the answer is what follows their common prefix. Needs numpy, onnxruntime, tokenizers.

    python3 scripts/tools/heldout_kl.py --policy pol.onnx --reference ref.onnx --data test.jsonl \\
        --tokenizer tokenizer.json --group-by regime
"""

import argparse
import json
import os
import sys

import numpy as np


def load_rows(path):
    rows = []
    for n, line in enumerate(open(path), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        if not all(isinstance(r.get(k), str) for k in ("prompt", "chosen", "rejected")):
            sys.exit(f"{path}:{n}: only plain-text prompt/chosen/rejected rows are supported here")
        rows.append(r)
    return rows


def eos_token(tokenizer_json):
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(tokenizer_json)), "tokenizer_config.json")
    try:
        eos = json.load(open(cfg_path)).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos:
            return eos
    except OSError:
        pass
    tok = json.load(open(tokenizer_json))
    for t in tok.get("added_tokens", []):
        if t["content"] in ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>"):
            return t["content"]
    sys.exit("no EOS token found (tokenizer_config.json beside the tokenizer names it)")


def split(tok, eos, prompt, answer):
    """(prompt ids, answer ids) as betadpo tokenizes a plain-text row."""
    p = tok.encode(prompt, add_special_tokens=True).ids
    full = tok.encode(prompt + answer + ("" if answer.endswith(eos) else eos), add_special_tokens=True).ids
    shared = 0
    while shared < min(len(p), len(full)) and p[shared] == full[shared]:
        shared += 1
    return full[:shared], full[shared:]


def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Model:
    def __init__(self, path, threads):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.s.get_inputs()}

    def logits(self, ids, mask):
        feed = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        return self.s.run(["logits"], feed)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--group-by", default="regime")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(a.tokenizer)
    eos = eos_token(a.tokenizer)
    seqs = []  # (group, prompt ids, answer ids)
    for r in load_rows(a.data):
        g = str(r.get(a.group_by, "all"))
        for key in ("chosen", "rejected"):
            p, ans = split(tok, eos, r["prompt"], r[key])
            if p and ans:
                seqs.append((g, p, ans))
    policy, reference = Model(a.policy, a.threads), Model(a.reference, a.threads)
    acc = {}  # group -> [token KL sum, tokens, answer KL sums, |drift| per answer]
    pad = tok.token_to_id(eos) or 0
    for b in range(0, len(seqs), a.batch_size):
        batch = seqs[b:b + a.batch_size]
        width = max(len(p) + len(ans) for _, p, ans in batch)
        ids = np.full((len(batch), width), pad, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for i, (_, p, ans) in enumerate(batch):
            ids[i, :len(p) + len(ans)] = p + ans
            mask[i, :len(p) + len(ans)] = 1
        lp, lr = log_softmax(policy.logits(ids, mask)), log_softmax(reference.logits(ids, mask))
        for i, (g, p, ans) in enumerate(batch):
            # logits at position t predict token t + 1: the answer's tokens are predicted from len(p) - 1 on
            pos = np.arange(len(p) - 1, len(p) + len(ans) - 1)
            kl = (np.exp(lp[i, pos]) * (lp[i, pos] - lr[i, pos])).sum(axis=-1)
            chosen = np.array(ans)
            drift = lp[i, pos, chosen].sum() - lr[i, pos, chosen].sum()
            s = acc.setdefault(g, [0.0, 0, [], []])
            s[0] += float(kl.sum())
            s[1] += len(ans)
            s[2].append(float(kl.sum()))
            s[3].append(abs(float(drift)))
    out = {g: {"kl_per_token": s[0] / s[1], "kl_per_answer": float(np.mean(s[2])), "drift": float(np.mean(s[3])),
               "answers": len(s[2])} for g, s in sorted(acc.items())}
    print("| group | KL per answer token | KL per answer | drift (mean abs log-ratio) | answers |")
    print("|---|---|---|---|---|")
    for g, v in out.items():
        print(f"| {g} | {v['kl_per_token']:.4f} | {v['kl_per_answer']:.3f} | {v['drift']:.3f} | {v['answers']} |")
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
