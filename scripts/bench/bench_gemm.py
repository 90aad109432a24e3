#!/usr/bin/env python3
"""GEMM throughput on the matrix shapes of a SmolLM2-135M training step, ONNX Runtime (MLAS) next to
PyTorch, to tell what a train step can cost at best. Not CI.

  scripts/.venv/bin/python scripts/bench/bench_gemm.py [--tokens 448] [--threads 2]

For each linear layer shape (K x N) and T tokens it times, as single-node ONNX graphs: the forward
product X[T,K] W[K,N], the input gradient G[T,N] W^T (Gemm transB), the weight gradient X^T G (Gemm
transA), and torch.matmul of the forward product; medians of 20 runs, in GFLOP/s (2 T K N / time).
"""
import argparse
import time

import numpy as np

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # q/o, k/v, gate/up, down


def ort_time(nodes, feeds, threads, reps=20):
    import onnx
    import onnx.helper as h
    import onnxruntime as ort
    tp = onnx.TensorProto
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info(k, tp.FLOAT, v.shape) for k, v in feeds.items()],
                     [h.make_tensor_value_info("Y", tp.FLOAT, None)])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 18)])
    m.ir_version = 9
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(3):
        s.run(None, feeds)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        s.run(None, feeds)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def torch_time(a, b, threads, reps=20):
    import torch
    torch.set_num_threads(threads)
    x, w = torch.from_numpy(a), torch.from_numpy(b)
    for _ in range(3):
        x @ w
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        x @ w
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=448, help="rows of the products (padded tokens of a batch)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import onnx.helper as h
    rng = np.random.default_rng(0)
    t = a.tokens
    print(f"{'K x N':>12} {'forward':>9} {'dX':>9} {'dW':>9} {'torch fwd':>10}   (GFLOP/s, {t} tokens, {a.threads} threads)")
    for k, n in SHAPES:
        x = rng.random((t, k), dtype=np.float32)
        w = rng.random((k, n), dtype=np.float32)
        g = rng.random((t, n), dtype=np.float32)
        flop = 2 * t * k * n / 1e9
        fwd = ort_time([h.make_node("MatMul", ["X", "W"], ["Y"])], {"X": x, "W": w}, a.threads)
        dx = ort_time([h.make_node("Gemm", ["G", "W"], ["Y"], transB=1)], {"G": g, "W": w}, a.threads)
        dw = ort_time([h.make_node("Gemm", ["X", "G"], ["Y"], transA=1)], {"X": x, "G": g}, a.threads)
        try:
            tf = f"{flop / torch_time(x, w, a.threads):10.0f}"
        except ImportError:
            tf = f"{'-':>10}"
        print(f"{k:>5} x {n:<5} {flop / fwd:9.0f} {flop / dx:9.0f} {flop / dw:9.0f} {tf}")


if __name__ == "__main__":
    main()
