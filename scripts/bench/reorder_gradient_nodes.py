#!/usr/bin/env python3
"""A copy of betadpo artifacts whose train.onnx lists the nodes that nothing reads last, in reverse order.

Measures what the order of nodes in the file does to ONNX Runtime's peak memory (docs/long-sequences.md,
"Why the recomputed graph keeps more than the formula says"). ONNX Runtime's default execution order is a
depth-first walk from the nodes whose outputs nothing reads (the weight gradients, the loss), starting
with the last one in the file. betadpo writes the backward pass from the loss down to block 0, so block 0's
weight gradients come last and are walked first: the walk then runs the whole backward pass before any
other block's weight gradients, and every block's recomputed tensors wait for them. Reversed, block 29's
weight gradients are walked first and each block's tensors die with its backward pass. Only the order of
nodes changes, never a value.

    python3 scripts/bench/reorder_gradient_nodes.py ART ART-reordered   # then: betadpo train --artifacts ART-reordered

Every other file of ART is hard-linked into the new folder (same file system). Needs the `onnx` package.
"""
import argparse
import collections
import os

import onnx


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifacts", help="a build-graph output folder")
    ap.add_argument("out", help="the new folder (must not exist)")
    a = ap.parse_args()
    os.makedirs(a.out)
    for name in os.listdir(a.artifacts):
        if name != "train.onnx":
            os.link(os.path.join(a.artifacts, name), os.path.join(a.out, name))
    model = onnx.load(os.path.join(a.artifacts, "train.onnx"), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise SystemExit("train.onnx has external initializers; this script handles graphs whose weights are inputs")
    readers = collections.Counter(x for n in model.graph.node for x in n.input)
    leaves = [n for n in model.graph.node if all(readers[o] == 0 for o in n.output)]
    leaf_ids = {id(n) for n in leaves}
    nodes = [n for n in model.graph.node if id(n) not in leaf_ids] + list(reversed(leaves))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, os.path.join(a.out, "train.onnx"))
    print(f"{a.out}: {len(leaves)} nodes that nothing reads moved to the end of train.onnx, in reverse order")


if __name__ == "__main__":
    main()
