#!/usr/bin/env python3
"""The per-step training loss of a perfectly calibrated DPO policy, on a data set's batches.

A pair's DPO loss is softplus(-beta m). On prompts whose labels are swapped with probability p, the
expected loss is lowest at beta m = ln((1-p)/p) towards the better answer; there an unswapped pair
costs ln(1/(1-p)) and a swapped one ln(1/p) (clean prompts, p = 0: nothing). This script draws the
batches as training does (the data's group of every pair, shuffled, `--batch-size` pairs a step),
draws each pair's swap with its group's p, and prints, over `--runs` shuffles, how often such a policy's
step loss goes above `--threshold` x ln 2 after step `--after`. It is the floor no beta can go below
on those batches: what a run above it pays is its margins' overshoot, not the label noise itself.

    python3 scripts/experiments/calibrated_batch_loss.py --data train.jsonl --steps 200 --swap clean=0,mixed=0.25,noise=0.5

Stdlib only; not part of CI.
"""

import argparse
import json
import math
import random
import statistics


def step_losses(groups, swap, batch_size, steps, rng):
    """One run's step losses: each epoch a fresh shuffle, its last batch possibly short (as `train`)."""
    out = []
    while len(out) < steps:
        order = list(range(len(groups)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            if len(out) == steps:
                break
            batch = order[start:start + batch_size]
            total = 0.0
            for i in batch:
                p = swap[groups[i]]
                if p > 0.0:
                    total += -math.log(p) if rng.random() < p else -math.log(1.0 - p)
            out.append(total / len(batch))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="JSONL preference pairs with a group column")
    ap.add_argument("--group-by", default="regime")
    ap.add_argument("--swap", default="clean=0,mixed=0.25,noise=0.5", help="group=swap probability, comma separated")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--after", type=int, default=20, help="count steps after this one")
    ap.add_argument("--threshold", type=float, default=1.5, help="in units of ln 2")
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    swap = {}
    for item in a.swap.split(","):
        name, p = item.split("=")
        swap[name.strip()] = float(p)
        if not 0.0 <= swap[name.strip()] <= 0.5:
            ap.error(f"--swap {item}: a swap probability must be in [0, 0.5]")
    groups = []
    with open(a.data) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            g = json.loads(line).get(a.group_by)
            if g not in swap:
                ap.error(f"{a.data}:{n}: group {g!r} has no --swap probability")
            groups.append(g)

    rng = random.Random(a.seed)
    ln2 = math.log(2)
    worst, above, means = [], [], []
    for _ in range(a.runs):
        run = [x / ln2 for x in step_losses(groups, swap, a.batch_size, a.steps, rng)]
        means.append(statistics.mean(run))
        losses = run[a.after:]
        worst.append(max(losses))
        above.append(sum(x > a.threshold for x in losses))
    share = sum(n > 0 for n in above) / a.runs
    q = statistics.quantiles(worst, n=20, method="inclusive")
    print(f"{len(groups)} pairs, {a.steps} steps of {a.batch_size}, {a.runs} shuffles; calibrated policy, steps after {a.after}:")
    print(f"  mean step loss {statistics.mean(means):.2f} ln 2")
    print(f"  worst step loss: median {statistics.median(worst):.2f} ln 2, 95th percentile {q[-1]:.2f}, max {max(worst):.2f}")
    print(f"  runs with a step above {a.threshold} ln 2: {share:.1%} (mean {statistics.mean(above):.2f} such steps a run)")


if __name__ == "__main__":
    main()
