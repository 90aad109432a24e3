#!/usr/bin/env python3
"""TensorBoard's own reader against a run's metrics.jsonl (not CI: needs the tensorboard package).

Reads RUN/runs/ with `tensorboard.backend.event_processing.event_accumulator.EventAccumulator` and checks
that every numeric value of every metrics.jsonl record is there, at the record's step, under
transformers' tag (`train/<key>`, `eval/...` as is), equal to the value rounded to float32 (TensorBoard
scalars are float32). Exit 1 on any difference.

Usage: scripts/.venv/bin/python scripts/experiments/check_tensorboard.py RUN
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the run folder (metrics.jsonl and runs/)")
    run = ap.parse_args().run
    acc = EventAccumulator(str(run / "runs"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    seen = {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags}
    checked, bad = 0, []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        step = rec["step"]
        for k, v in rec.items():
            if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            tag = k if k.startswith("eval/") else f"train/{k}"
            want = float(np.float32(v))
            got = seen.get(tag, {}).get(step)
            checked += 1
            if got is None or got != want:
                bad.append(f"{tag} at step {step}: TensorBoard {got}, metrics.jsonl {v} (float32 {want})")
    print(f"{checked} scalars of {run / 'metrics.jsonl'} checked against TensorBoard's EventAccumulator ({len(tags)} tags)")
    for b in bad[:20]:
        print("  MISMATCH", b)
    sys.exit(1 if bad or checked == 0 else 0)


if __name__ == "__main__":
    main()
