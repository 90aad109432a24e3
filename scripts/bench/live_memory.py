#!/usr/bin/env python3
"""What a graph run holds at its peak, reconstructed from an ONNX Runtime profile and the graph.

Usage
  python3 scripts/bench/live_memory.py --graph ART/train.onnx --profile PROFILE.json [--top 25]

ONNX Runtime's profile records, per kernel, when it ran and the bytes of its outputs; the graph says who
reads each output. A tensor is taken to live from the start of its producer to the end of its last
reader (graph outputs to the end of the run); views (Reshape, Squeeze, Unsqueeze, Flatten, Identity)
are counted as free. The peak of the sum, and the largest tensors alive there by producer, show what
decides the peak of a run, which RSS sampling alone cannot. Only the last profiled run is read. Needs
`onnx` (the graph's structure, without its weights).
"""
import argparse
import collections
import json
import re

import onnx

VIEWS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def last_run(events):
    """The kernel events of the last `model_run` in the profile."""
    runs = [e for e in events if e.get("name") == "model_run"]
    start = runs[-1]["ts"] if runs else 0
    return [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--graph", required=True)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    g = onnx.load(a.graph, load_external_data=False).graph
    by_name = {n.name: n for n in g.node}
    kernels = last_run(json.load(open(a.profile)))
    when = {}
    for e in kernels:
        node = e["name"][: -len("_kernel_time")]
        # a fused kernel carries the name of the node whose output it writes, plus the fusion's
        node = node if node in by_name else re.sub(r"/[A-Za-z]*Fusion/?$", "", node)
        if node in by_name:
            when[node] = (e["ts"], e["ts"] + e["dur"], int(e["args"].get("output_size", 0)))
    end = max(t[1] for t in when.values())
    outputs = {o.name for o in g.output}
    last_read = collections.defaultdict(int)
    for n in g.node:
        if n.name in when:
            for x in n.input:
                last_read[x] = max(last_read[x], when[n.name][1])
    spans = []  # (start, stop, bytes, node)
    for n in g.node:
        if n.name not in when or n.op_type in VIEWS:
            continue
        start, stop, size = when[n.name]
        outs = [o for o in n.output if o]
        death = max([end if o in outputs else last_read.get(o, stop) for o in outs] + [stop])
        spans.append((start, death, size, n))
    events = sorted([(s, b) for s, _, b, _ in spans] + [(d, -b) for _, d, b, _ in spans], key=lambda x: (x[0], x[1]))
    live = peak = peak_t = 0
    for t, b in events:
        live += b
        if live > peak:
            peak, peak_t = live, t
    alive = [(b, n) for s, d, b, n in spans if s <= peak_t < d]
    print(f"{len(when)} of {len(kernels)} kernels matched to nodes; peak of live outputs {peak / 2**20:.0f} MiB at {(peak_t - kernels[0]['ts']) / 1e6:.2f} s of {(end - kernels[0]['ts']) / 1e6:.2f} s")
    groups = collections.Counter()
    for b, n in alive:
        groups[(n.op_type, "grad" if n.name.startswith("grad/") else "recomputed" if n.name.startswith("recomputed/") else "forward")] += b
    print("alive at the peak, by producer op and pass:")
    for (op, where), b in groups.most_common(a.top):
        print(f"  {b / 2**20:9.1f} MiB  {op:<14} {where}")
    print("largest tensors alive at the peak:")
    for b, n in sorted(alive, key=lambda x: -x[0])[: a.top]:
        print(f"  {b / 2**20:9.1f} MiB  {n.op_type:<12} {n.name}")


if __name__ == "__main__":
    main()
