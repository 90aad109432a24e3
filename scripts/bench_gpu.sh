#!/usr/bin/env bash
# GPU speed check, prepared for a session that has an NVIDIA GPU: builds betadpo, then times the
# learnable-beta DPO step of `betadpo train --ep cuda` and `--ep tensorrt` against PyTorch on the same
# GPU (scripts/bench_vs_pytorch.py --device cuda) and prints one table. Not part of CI.
#
#   bash scripts/bench_gpu.sh                 # SmolLM2-135M from /tmp/smollm2, 8 and 32 pairs
#   PAIRS=8 MODEL_DIR=/path/with/model.onnx+tokenizer.json bash scripts/bench_gpu.sh
#
# Needs: nvidia-smi and a CUDA driver; a Python with torch (CUDA build), transformers, tokenizers
# (PYTHON, default scripts/.venv/bin/python, made by scripts/setup_venv.sh); ONNX Runtime's GPU build
# (betadpo provisions the onnxruntime-gpu wheel from PyPI on first use; offline, point ORT_DYLIB_PATH
# at its libonnxruntime.so) with the CUDA/cuDNN (and TensorRT, for --ep tensorrt) libraries it was
# built against on the loader path. Each missing piece stops the script with a one-line reason before any timing starts.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-scripts/.venv/bin/python}
MODEL_DIR=${MODEL_DIR:-/tmp/smollm2}
PAIRS=${PAIRS:-8,32}
OUT=${OUT:-/tmp/betadpo-gpu-bench}
mkdir -p "$OUT"

fail() { echo "bench_gpu: $*" >&2; exit 2; }
command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: no NVIDIA driver on this machine"
nvidia-smi -L | head -n 4
[ -x "$PYTHON" ] || fail "$PYTHON not found (bash scripts/setup_venv.sh, or set PYTHON)"
"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || fail "PyTorch in $PYTHON cannot see a CUDA device (CPU-only build?)"
[ -f "$MODEL_DIR/model.onnx" ] || bash scripts/export_smollm2.sh "$MODEL_DIR" \
  || fail "no $MODEL_DIR/model.onnx and the SmolLM2 export failed"

cargo build --release --quiet
BIN=target/release/betadpo
ART="$OUT/artifacts"
[ -f "$ART/manifest.json" ] || "$BIN" build-graph --model "$MODEL_DIR/model.onnx" --out "$ART" --quiet

for ep in cuda tensorrt; do
  echo "== betadpo --ep $ep vs PyTorch on cuda, pairs $PAIRS"
  # the step is short on a GPU: more timed steps, one warm-up more (TensorRT builds engines then)
  if ! "$PYTHON" scripts/bench_vs_pytorch.py --preset smollm2 --onnx "$MODEL_DIR/model.onnx" \
      --tokenizer "$MODEL_DIR/tokenizer.json" --artifacts "$ART" --betadpo "$BIN" --device cuda \
      --ep "$ep" --pairs "$PAIRS" --steps 10 --warmup 2 --rounds 1 --threads 4 \
      --json "$OUT/$ep.json" 2>&1 | tee "$OUT/$ep.log"; then
    echo "(the $ep run failed; see $OUT/$ep.log)"
  fi
done

"$PYTHON" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
print(f"\n{'ep':9s} {'pairs':>5s} {'PyTorch s':>10s} {'betadpo s':>10s} {'ratio':>7s}")
for ep in ("cuda", "tensorrt"):
    path = os.path.join(out, f"{ep}.json")
    if not os.path.exists(path):
        print(f"{ep:9s} (no result)")
        continue
    for r in json.load(open(path)).get("results", []):
        t, b = r.get("sides", {}).get("torch", {}), r.get("sides", {}).get("betadpo", {})
        ts, bs = t.get("median_step_s"), b.get("median_step_s")
        ratio = f"{bs / ts:.2f}x" if ts and bs else "-"
        fmt = lambda v: f"{v:.4f}" if v else "failed"
        print(f"{ep:9s} {r.get('pairs', '?'):>5} {fmt(ts):>10s} {fmt(bs):>10s} {ratio:>7s}")
EOF
