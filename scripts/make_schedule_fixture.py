#!/usr/bin/env python3
"""Learning-rate multipliers computed by transformers itself, for `cargo test --test schedules`.

For a grid of schedule types, run lengths and warm-ups (steps, or a ratio resolved by
`TrainingArguments.get_warmup_steps`: transformers 5 takes the ratio as a `warmup_steps` below 1), builds `transformers.get_scheduler` on a one-parameter AdamW with
learning rate 1.0 and records `get_last_lr()[0]` before each optimizer step: the multiplier that step
runs at. Writes tests/fixtures/schedules/transformers_schedules.json.

Usage: scripts/.venv/bin/python scripts/make_schedule_fixture.py
"""

import json
from pathlib import Path

import torch
import transformers
from transformers import TrainingArguments, get_scheduler

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "schedules" / "transformers_schedules.json"
TYPES = ["linear", "cosine", "constant", "constant_with_warmup"]
TOTALS = [1, 2, 3, 10, 25, 30, 100]
WARMUPS = [0, 1, 3, 10]
# 0.07 x 100 is 7.000000000000001 in binary: ceil gives 8, and so must betadpo
RATIOS = [0.03, 0.07, 0.1, 0.25, 0.5]


def warmup_from_ratio(ratio: float, total: int) -> int:
    args = TrainingArguments(output_dir="/tmp/unused-schedule-fixture", warmup_steps=ratio, report_to=[])
    return args.get_warmup_steps(total)


def multipliers(kind: str, total: int, warmup: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=total)
    out = []
    for _ in range(total):
        out.append(float(sched.get_last_lr()[0]))
        opt.step()
        sched.step()
    return out


def main():
    cases = []
    for kind in TYPES:
        for total in TOTALS:
            for w in WARMUPS:
                if w <= total:
                    cases.append({"type": kind, "total": total, "warmup_steps": w, "warmup_ratio": 0.0, "multipliers": multipliers(kind, total, w)})
            for r in RATIOS:
                w = warmup_from_ratio(r, total)
                cases.append({"type": kind, "total": total, "warmup_steps": 0, "warmup_ratio": r, "resolved_warmup": w,
                              "multipliers": multipliers(kind, total, w)})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__, "cases": cases}, indent=1) + "\n")
    print(f"{len(cases)} cases -> {OUT}")


if __name__ == "__main__":
    main()
