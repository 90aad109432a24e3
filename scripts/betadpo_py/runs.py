"""What the end-to-end checks in experiments/ share: running a command with its timing printed, and a
right-padded batch of prompts."""
import os
import subprocess
import sys
import time

import numpy as np


def sh(*args):
    t = time.time()
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)}\n{r.stdout}\n{r.stderr}")
    print(f"  {time.time() - t:6.1f} s  {' '.join(os.path.basename(a) if a.startswith('/') else a for a in args[:4])} ...")
    return r.stdout


def prompt_batch(tokenizer):
    """A right-padded batch of four prompts of different lengths: (input_ids, attention_mask)."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Write a haiku about the sea.", "Hi"]
    rows = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    T = max(map(len, rows))
    ids = np.zeros((len(rows), T), np.int64)
    mask = np.zeros((len(rows), T), np.int64)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = row
        mask[r, :len(row)] = 1
    return ids, mask
