#!/usr/bin/env python3
"""Benchmark `betadpo build-graph`: wall time and peak memory against the size of the model.

Usage
  python3 scripts/bench/bench_build_graph.py --model /tmp/smollm2/model.onnx
  python3 scripts/bench/bench_build_graph.py --model M.onnx --repeat 3 --betadpo target/release/betadpo \
      --out /tmp/bdp-bench-art -- --trainable head        # arguments after `--` go to build-graph

Runs `betadpo build-graph --model M --out OUT --quiet [extra args]` --repeat times, each in its own child
process, and prints per run the wall time (and user + system CPU time, which other load on the
machine distorts less), the child's peak resident set size (ru_maxrss from wait4(2),
i.e. what `/usr/bin/time -v` reports as "Maximum resident set size") and the ratio of that peak to the
model's size on disk: the .onnx file plus every external data file it references. The first run may read
the model from disk; later runs usually find it in the page cache (the page cache is not counted in RSS,
but pages of a memory-mapped model that the process touches are).

Target (issue): a ~540 MB fp32 model (SmolLM2-135M) in under 5 s, with peak RSS under 2x the model size.
`--max-seconds` / `--max-ratio` turn the target into an exit status (1 when the median misses it).

Needs only the Python standard library; with the `onnx` package importable the external data files are
read from the model itself, otherwise every file beside the model whose name starts with the model's
file name (model.onnx.data, model.onnx_data, ...) is counted.
"""
import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from betadpo_py.paths import ROOT


def external_data_files(model):
    """Paths of the external data files `model` references (deduplicated)."""
    d = os.path.dirname(os.path.abspath(model))
    try:
        import onnx
        proto = onnx.load(model, load_external_data=False)
        locs = set()

        def scan(graph):
            for t in graph.initializer:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    for e in t.external_data:
                        if e.key == "location":
                            locs.add(e.value)
            for n in graph.node:
                for a in n.attribute:
                    if a.type == onnx.AttributeProto.GRAPH:
                        scan(a.g)
                    for g in a.graphs:
                        scan(g)
        scan(proto.graph)
        return sorted(os.path.join(d, l) for l in locs)
    except ImportError:
        base = os.path.basename(model)
        return sorted(p for p in glob.glob(os.path.join(d, base + "*")) if os.path.abspath(p) != os.path.abspath(model))


def run_child(cmd):
    """Runs cmd; returns (exit status, wall seconds, peak RSS bytes, combined output, CPU seconds)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.read()  # the child writes little; read it all before reaping
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    return p.returncode, wall, ru.ru_maxrss * 1024, out.decode(errors="replace"), ru.ru_utime + ru.ru_stime


def mib(n):
    return n / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="exported model (.onnx; external data beside it)")
    ap.add_argument("--out", default=None, help="artifacts directory (default: a temporary one, removed)")
    ap.add_argument("--betadpo", default=os.path.join(ROOT, "target", "release", "betadpo"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=None, help="fail when the median wall time exceeds it")
    ap.add_argument("--max-ratio", type=float, default=None, help="fail when the median peak RSS / model size exceeds it")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("extra", nargs="*", help="arguments passed on to build-graph (after --)")
    a = ap.parse_args()

    if not os.path.exists(a.betadpo):
        sys.exit(f"{a.betadpo} not found: build it with `cargo build --release` or pass --betadpo")
    data = external_data_files(a.model)
    model_bytes = os.path.getsize(a.model) + sum(os.path.getsize(p) for p in data)
    out = a.out or f"/tmp/bench-build-graph-{os.getpid()}"
    cmd = [a.betadpo, "build-graph", "--model", a.model, "--out", out, "--quiet", *a.extra]
    print(f"model: {a.model} ({mib(os.path.getsize(a.model)):.1f} MiB graph + "
          f"{mib(model_bytes - os.path.getsize(a.model)):.1f} MiB in {len(data)} external data file(s) "
          f"= {mib(model_bytes):.1f} MiB)")
    print("command:", " ".join(cmd))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")

    runs = []
    for i in range(a.repeat):
        rc, wall, rss, text, cpu = run_child(cmd)
        if rc != 0:
            print(text)
            sys.exit(f"run {i + 1}: build-graph exited with status {rc}")
        reported = next((l for l in text.splitlines() if l.startswith("wrote ")), "").strip()
        runs.append(dict(wall_s=wall, cpu_s=cpu, peak_rss_bytes=rss, ratio=rss / model_bytes))
        print(f"run {i + 1}: wall {wall:6.2f} s (CPU {cpu:6.2f} s)   peak RSS {mib(rss):8.1f} MiB   "
              f"peak/model {rss / model_bytes:5.2f}x   [{reported}]")
    art_bytes = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    if a.out is None:
        shutil.rmtree(out, ignore_errors=True)

    med_wall = statistics.median(r["wall_s"] for r in runs)
    med_rss = statistics.median(r["peak_rss_bytes"] for r in runs)
    ratio = med_rss / model_bytes
    print(f"median: wall {med_wall:.2f} s, peak RSS {mib(med_rss):.1f} MiB = {ratio:.2f}x the model "
          f"({mib(model_bytes):.1f} MiB); artifacts {mib(art_bytes):.1f} MiB")
    ok = True
    if a.max_seconds is not None:
        good = med_wall <= a.max_seconds
        ok &= good
        print(f"time target  <= {a.max_seconds:g} s: {'met' if good else 'MISSED'}")
    if a.max_ratio is not None:
        good = ratio <= a.max_ratio
        ok &= good
        print(f"memory target <= {a.max_ratio:g}x: {'met' if good else 'MISSED'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(model=a.model, model_bytes=model_bytes, artifacts_bytes=art_bytes, command=cmd,
                           runs=runs, median_wall_s=med_wall, median_peak_rss_bytes=med_rss,
                           median_ratio=ratio), f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
