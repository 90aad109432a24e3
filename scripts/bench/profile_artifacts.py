#!/usr/bin/env python3
"""Time betadpo's train graph and optimizer graph separately with ONNX Runtime, and list where time goes.

Usage
  python3 scripts/bench/profile_artifacts.py --artifacts ART [--pairs 8] [--seq 28] [--threads 2] [--runs 3]
         [--no-arena] [--profile-dir DIR] [--top 15] [--json OUT]
  # or only summarise existing ONNX Runtime profiles, e.g. those of `betadpo train --profile PREFIX`
  python3 scripts/bench/profile_artifacts.py --summarize PREFIX*.json [--skip-runs 1]

Needs numpy and onnxruntime only (no torch). Use the onnxruntime version betadpo loads (1.32.0, the
version `betadpo train` provisions) so the kernels are the same:  pip install onnxruntime==1.32.0 numpy

What it does
  1. Reads ART/manifest.json and ART/params.safetensors (the initial parameters).
  2. Makes a batch of --pairs pairs, 2*pairs rows of --seq tokens: random token ids, all positions real
     (no padding), the last --answer tokens of every row the answer (completion_mask 1). The reference
     log-probs are the policy's own (one eval-graph run first), as at the first step of real training,
     so the loss is log 2 and the gradients are ordinary numbers (a saturated loss gives tiny, possibly
     denormal gradients, which are slow on x86 and would distort the timing).
  3. Creates the train and optimizer sessions like betadpo does (CPU, --threads intra-op threads, all
     graph optimizations, memory patterns on) and times --runs runs of each after one warm-up run; the
     optimizer gets the train graph's gradients, zero Adam moments and betadpo's default hyperparameters.
  4. Repeats with ONNX Runtime's profiler on and prints, per graph: the time per operator type, the split
     forward / DPO objective / backward (by node name: betadpo names backward nodes `grad/...` and the
     objective's `dpo/...`), the slowest nodes, and how much of a run is spent outside kernels.
  Peak resident memory (VmHWM) after each phase is printed too.
"""
import argparse
import collections
import json
import os
import resource
import struct
import time

import numpy as np
import onnxruntime as ort


def rss(key="VmRSS"):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def read_params(path):
    """{name: float32 array} from a safetensors file, as views of one buffer (no per-tensor copies)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        buf = bytearray(f.read())
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info["dtype"])
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(buf, dtype=np.float32, count=(b - a) // 4, offset=a).reshape(info["shape"])
    return out


def session(path, threads, arena, profile_prefix=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_mem_pattern = True
    so.enable_cpu_mem_arena = arena
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    t0 = time.perf_counter()
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return s, time.perf_counter() - t0


def feeds_for(spec, batch, params, extra):
    f = {}
    for i in spec["inputs"]:
        role = i["role"]
        if role in batch:
            f[i["name"]] = batch[role]
        elif role == "parameter":
            f[i["name"]] = params[i["parameter"]]
        elif role in extra:
            f[i["name"]] = extra[role](i)
        else:
            raise SystemExit(f"input {i['name']} has role {role}, unknown to this script")
    return f


def timed(sess, feeds, runs):
    """Times `runs` runs after one warm-up; returns (seconds per run, last outputs, CPU/fault counts
    per run). The previous run's outputs are released before the next run, as betadpo does."""
    out = sess.run(None, feeds)  # warm-up: memory planning, arena growth
    ts = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(runs):
        del out
        t0 = time.perf_counter()
        out = sess.run(None, feeds)
        ts.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    usage = dict(user_s=(r1.ru_utime - r0.ru_utime) / runs, sys_s=(r1.ru_stime - r0.ru_stime) / runs,
                 minor_faults=(r1.ru_minflt - r0.ru_minflt) / runs)
    return ts, out, usage


def usage_text(u):
    return (f"per run: user {u['user_s']:.2f} s, system {u['sys_s']:.2f} s, "
            f"{u['minor_faults'] / 1e3:.0f}k page faults (~{u['minor_faults'] * 4 / 1024:.0f} MiB first-touched)")


def drop_first_runs(path, n):
    """Writes PATH minus its first n model runs (and their node events) to *_steady.json; returns it."""
    ev = json.load(open(path))
    runs = sorted((e for e in ev if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if n <= 0 or len(runs) <= n:
        return path
    cut = runs[n - 1]["ts"] + runs[n - 1]["dur"]
    dropped = {id(e) for e in runs[:n]}
    ev = [e for e in ev if id(e) not in dropped and not (e.get("cat") == "Node" and e["ts"] < cut)]
    out = path[:-len(".json")] + "_steady.json" if path.endswith(".json") else path + "_steady.json"
    json.dump(ev, open(out, "w"))
    return out


def summarize_profile(path, top, title):
    events = json.load(open(path))
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    n_runs = max(len(runs), 1)
    by_op = collections.Counter()
    by_node = collections.Counter()
    by_part = collections.Counter()
    count_op = collections.Counter()
    for e in nodes:
        op = e["args"].get("op_name", "?")
        name = e["name"][: -len("_kernel_time")]
        by_op[op] += e["dur"]
        count_op[op] += 1
        by_node[(name, op)] += e["dur"]
        part = "backward" if name.startswith("grad/") else "dpo objective" if name.startswith("dpo/") else "forward"
        by_part[part] += e["dur"]
    kernel = sum(by_op.values()) / n_runs / 1e6
    run_s = sum(e["dur"] for e in runs) / n_runs / 1e6
    print(f"\n--- {title}: {n_runs} profiled run(s), {run_s:.3f} s per run, kernels {kernel:.3f} s "
          f"({100 * kernel / run_s if run_s else 0:.0f}%), outside kernels {run_s - kernel:.3f} s")
    if len(by_part) > 1:
        print("  " + ", ".join(f"{k} {v / n_runs / 1e6:.3f} s" for k, v in by_part.most_common()))
    total = sum(by_op.values())
    print(f"  {'operator':24s} {'s/run':>8s} {'share':>6s} {'calls/run':>9s}")
    for op, d in by_op.most_common(top):
        print(f"  {op:24s} {d / n_runs / 1e6:8.3f} {100 * d / total:5.1f}% {count_op[op] / n_runs:9.0f}")
    print("  slowest nodes:")
    for (name, op), d in by_node.most_common(top):
        print(f"    {d / n_runs / 1e6:8.3f} s  {op:14s} {name}")
    return dict(run_s=run_s, kernel_s=kernel, by_op={k: v / n_runs / 1e6 for k, v in by_op.most_common()},
                by_part={k: v / n_runs / 1e6 for k, v in by_part.items()},
                top_nodes=[(n, o, d / n_runs / 1e6) for (n, o), d in by_node.most_common(top)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts")
    ap.add_argument("--summarize", nargs="+", metavar="PROFILE_JSON",
                    help="only summarise these ONNX Runtime profile files")
    ap.add_argument("--skip-runs", type=int, default=1,
                    help="with --summarize: leave out each file's first N runs (warm-up)")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--seq", type=int, default=28, help="tokens per row")
    ap.add_argument("--answer", type=int, default=10, help="answer tokens per row (end of the row)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-arena", action="store_true", help="disable ONNX Runtime's CPU memory arena")
    ap.add_argument("--no-profile", action="store_true", help="timing only, no operator breakdown")
    ap.add_argument("--profile-dir", default="/tmp", help="where ONNX Runtime writes its profile JSON")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.summarize:
        for path in a.summarize:
            summarize_profile(drop_first_runs(path, a.skip_runs), a.top, os.path.basename(path))
        return
    if not a.artifacts:
        ap.error("--artifacts is required (or --summarize)")

    man = json.load(open(os.path.join(a.artifacts, "manifest.json")))
    g = man["graphs"]
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}, {a.threads} threads, arena "
          f"{'off' if a.no_arena else 'on'}, load average {os.getloadavg()[0]:.2f}")
    params = read_params(os.path.join(a.artifacts, man["parameters_file"]))
    print(f"parameters: {sum(v.size for v in params.values()) / 1e6:.2f}M; RSS {rss():.0f} MiB")

    rows, T = 2 * a.pairs, a.seq
    rng = np.random.default_rng(0)
    vocab = man["model"]["vocab_size"]
    comp = np.zeros((rows, T), np.float32)
    comp[:, T - a.answer:] = 1.0
    batch = dict(input_ids=rng.integers(0, vocab, (rows, T), dtype=np.int64),
                 attention_mask=np.ones((rows, T), np.int64),
                 position_ids=np.tile(np.arange(T, dtype=np.int64), (rows, 1)),
                 completion_mask=comp, ref_logps=np.zeros(rows, np.float32))
    print(f"batch: {a.pairs} pairs = {rows} rows x {T} tokens ({rows * T} tokens)")

    res = dict(pairs=a.pairs, seq=T, threads=a.threads, arena=not a.no_arena, onnxruntime=ort.__version__)
    # reference log-probs = the policy's own, so the first step is an ordinary one (loss log 2)
    ev, _ = session(os.path.join(a.artifacts, g["eval"]["file"]), a.threads, not a.no_arena)
    ev_out = ev.run(None, feeds_for(g["eval"], batch, params, {}))
    names = [o.name for o in ev.get_outputs()]
    pol = [o["name"] for o in g["eval"]["outputs"] if o["role"] == "metric"][2]  # policy_logps
    batch["ref_logps"] = ev_out[names.index(pol)].astype(np.float32)
    del ev, ev_out

    tr, load_s = session(os.path.join(a.artifacts, g["train"]["file"]), a.threads, not a.no_arena)
    train_feeds = feeds_for(g["train"], batch, params, {})
    ts, out, usage = timed(tr, train_feeds, a.runs)
    out_names = [o.name for o in tr.get_outputs()]
    loss = float(out[out_names.index("loss")]) if "loss" in out_names else float("nan")
    print(f"train graph:     session {load_s:.2f} s; run {np.median(ts):.3f} s median "
          f"({' '.join(f'{t:.3f}' for t in ts)}); loss {loss:.4f}; RSS {rss():.0f} MiB, peak {rss('VmHWM'):.0f} MiB")
    print("                 " + usage_text(usage))
    res["train_s"], res["train_usage"] = ts, usage
    grads = {}
    for o in g["train"]["outputs"]:
        if o["role"] == "gradient":
            grads[o["parameter"]] = out[out_names.index(o["name"])]
    del out

    scal = dict(learning_rate=1e-3, head_learning_rate=1e-2, step=1.0, adam_beta1=0.9, adam_beta2=0.999,
                adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0, gradient_scale=1.0)
    zeros = {}

    def zero_like(i):
        return zeros.setdefault((i["role"], i["parameter"]), np.zeros(i["shape"], np.float32))
    extra = {k: (lambda i, v=v: np.array(v, np.float32)) for k, v in scal.items()}
    extra.update(gradient=lambda i: grads[i["parameter"]], adam_m=zero_like, adam_v=zero_like)
    opt, load_s = session(os.path.join(a.artifacts, g["optimizer"]["file"]), a.threads, not a.no_arena)
    opt_feeds = feeds_for(g["optimizer"], {}, params, extra)
    ts, out, usage = timed(opt, opt_feeds, a.runs)
    del out
    print(f"optimizer graph: session {load_s:.2f} s; run {np.median(ts):.3f} s median "
          f"({' '.join(f'{t:.3f}' for t in ts)}); RSS {rss():.0f} MiB, peak {rss('VmHWM'):.0f} MiB")
    print("                 " + usage_text(usage))
    res["optimizer_s"], res["optimizer_usage"] = ts, usage
    res["peak_rss_mib"] = rss("VmHWM")
    del tr, opt

    if not a.no_profile:
        os.makedirs(a.profile_dir, exist_ok=True)
        for which, feeds in (("train", train_feeds), ("optimizer", opt_feeds)):
            prefix = os.path.join(a.profile_dir, f"betadpo_{which}")
            s, _ = session(os.path.join(a.artifacts, g[which]["file"]), a.threads, not a.no_arena, prefix)
            for _ in range(1 + a.runs):
                s.run(None, feeds)
            path = s.end_profiling()
            print(f"\nprofile: {path}")
            path = drop_first_runs(path, 1)
            res[f"{which}_profile"] = summarize_profile(path, a.top, f"{which} graph")
            del s
    if a.json:
        json.dump(res, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
