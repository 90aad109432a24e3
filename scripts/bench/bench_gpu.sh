#!/usr/bin/env bash
# GPU measurement (issue 15, item 5), prepared as one script for a machine with an NVIDIA GPU: betadpo on the
# CUDA and TensorRT providers, float32 and bf16 (bf16 only when `build-graph --precision` exists), against
# PyTorch eager (float32, bf16 autocast) and torch.compile (bf16 autocast) on the same GPU, for SmolLM2-135M
# and a random-weight model of Llama-3.2-1B's shape, 8 and 32 pairs. Per configuration: median step time,
# tokens/s, peak device memory, and the first losses next to PyTorch float32 eager's. Not part of CI.
#
#   bash scripts/bench/bench_gpu.sh                      # everything (SmolLM2 + 1B, 8 and 32 pairs)
#   MODELS=smollm2 PAIRS=8 bash scripts/bench/bench_gpu.sh
#   DRY_RUN=1 bash scripts/bench/bench_gpu.sh            # no GPU needed: checks the set-up, prints the plan
#   SUMMARY_ONLY=1 MODELS=... bash scripts/bench/bench_gpu.sh   # only the table, from the JSON files in $OUT
#
# Needs: an NVIDIA driver (nvidia-smi), a Python with torch (CUDA build), transformers, tokenizers, gguf
# (PYTHON, default scripts/.venv/bin/python, made by scripts/tools/setup_venv.sh), pip access to PyPI: betadpo
# provisions onnxruntime-gpu and the CUDA / cuDNN / TensorRT libraries itself (`betadpo doctor --ep tensorrt`
# shows what it found). Each missing piece stops the script with a one-line reason before any timing starts.
#
# Device memory: PyTorch reports torch.cuda.max_memory_allocated (tensors only); for betadpo, nvidia-smi's
# memory.used is sampled every 100 ms during the run, minus its value before (includes ONNX Runtime's arena
# and CUDA context, so it reads higher than PyTorch's figure for the same tensors).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-scripts/.venv/bin/python}
MODELS=${MODELS:-smollm2,llama-1b}
PAIRS=${PAIRS:-8,32}
EPS=${EPS:-cuda,tensorrt}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}   # TensorRT builds its engines during the first steps
OUT=${OUT:-/tmp/betadpo-gpu-bench}
DRY_RUN=${DRY_RUN:-0}
SUMMARY_ONLY=${SUMMARY_ONLY:-0}
mkdir -p "$OUT"

fail() { echo "bench_gpu: $*" >&2; exit 2; }
note() { echo "bench_gpu: $*" >&2; }
run() { if [ "$DRY_RUN" = 1 ]; then echo "would run: $*"; else "$@"; fi; }

if [ "$SUMMARY_ONLY" != 1 ]; then
# ---------------------------------------------------------------------------------------------- set-up
[ -x "$PYTHON" ] || fail "$PYTHON not found (bash scripts/tools/setup_venv.sh, or set PYTHON)"
"$PYTHON" -c 'import torch, transformers, tokenizers' 2>/dev/null || fail "$PYTHON lacks torch, transformers or tokenizers"
if [ "$DRY_RUN" = 1 ]; then
  note "DRY_RUN: no GPU checks, no timing"
  BIN=${BIN:-target/debug/betadpo}
  [ -x "$BIN" ] || BIN=target/release/betadpo
  [ -x "$BIN" ] || fail "no betadpo binary (cargo build)"
else
  command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: no NVIDIA driver on this machine"
  nvidia-smi -L | head -n 4
  "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || fail "PyTorch in $PYTHON cannot see a CUDA device (CPU-only build?)"
  cargo build --release --quiet
  BIN=${BIN:-target/release/betadpo}
fi
for ep in ${EPS//,/ }; do
  # Provisions onnxruntime-gpu and the NVIDIA libraries on the first call; fails with its reason.
  if [ "$DRY_RUN" = 1 ]; then echo "would run: $BIN doctor --ep $ep"; else "$BIN" doctor --ep "$ep" || fail "betadpo doctor --ep $ep failed (above)"; fi
done
if "$BIN" build-graph --help | grep -q -- '--precision'; then
  PRECISIONS=fp32,bf16
else
  PRECISIONS=fp32
  note "build-graph has no --precision yet: betadpo runs float32 only"
fi

# ---------------------------------------------------------------------------------------------- models
# name -> (onnx, tokenizer, torch model, data); exported on first use.
model_args() {
  case "$1" in
    smollm2) echo "--preset smollm2" ;;
    llama-1b) echo "--onnx /tmp/llama1b/model.onnx --tokenizer /tmp/smollm2/tokenizer.json --torch-model shape:llama-3.2-1b --data graphs/quickstart/train.jsonl" ;;
    *) fail "unknown model '$1' (choose smollm2, llama-1b)" ;;
  esac
}
model_onnx() { case "$1" in smollm2) echo /tmp/smollm2/model.onnx ;; llama-1b) echo /tmp/llama1b/model.onnx ;; esac; }
for model in ${MODELS//,/ }; do
  model_args "$model" >/dev/null
  onnx=$(model_onnx "$model")
  [ -f "$onnx" ] && continue
  case "$model" in
    smollm2) run bash scripts/tools/export_smollm2.sh /tmp/smollm2 || fail "SmolLM2 export failed" ;;
    llama-1b)
      [ -f /tmp/smollm2/tokenizer.json ] || run bash scripts/tools/export_smollm2.sh /tmp/smollm2 || fail "SmolLM2 export failed (its tokenizer is used)"
      run "$PYTHON" scripts/tools/export_hf.py --shape llama-3.2-1b --out /tmp/llama1b --no-hf-map || fail "1B export failed" ;;
  esac
done

# ---------------------------------------------------------------------------------------------- runs
# Samples nvidia-smi's memory.used (MiB, GPU 0) into $1 until killed.
sample_memory() { while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 >>"$1" 2>/dev/null || true; sleep 0.1; done; }

common="--pairs $PAIRS --steps $STEPS --warmup $WARMUP --rounds 1 --threads 4 --device cuda --layout packed"
for model in ${MODELS//,/ }; do
  margs=$(model_args "$model")
  # PyTorch: eager float32 (the reference for the losses), eager bf16 autocast, torch.compile bf16.
  for variant in eager-fp32 eager-bf16 compile-bf16; do
    flags=""
    case "$variant" in *bf16) flags="--torch-amp bf16" ;; esac
    case "$variant" in compile*) flags="$flags --torch-compile" ;; esac
    tag="$model.torch-$variant"
    echo "== $tag"
    if [ "$DRY_RUN" = 1 ]; then
      echo "would run: bench_vs_pytorch.py $margs $common --only torch $flags"
      continue
    fi
    # shellcheck disable=SC2086
    "$PYTHON" scripts/bench/bench_vs_pytorch.py $margs $common --only torch $flags --json "$OUT/$tag.json" \
      >"$OUT/$tag.log" 2>&1 || note "$tag failed; see $OUT/$tag.log"
  done
  for prec in ${PRECISIONS//,/ }; do
    art="$OUT/$model.artifacts-$prec"
    pflag=""
    [ "$prec" = fp32 ] || pflag="--precision $prec"
    # shellcheck disable=SC2086
    [ -f "$art/manifest.json" ] || run "$BIN" build-graph --model "$(model_onnx "$model")" --out "$art" --layout packed $pflag --quiet \
      || { note "build-graph $model $prec failed"; continue; }
    for ep in ${EPS//,/ }; do
      tag="$model.betadpo-$ep-$prec"
      echo "== $tag"
      if [ "$DRY_RUN" = 1 ]; then
        echo "would run: bench_vs_pytorch.py $margs $common --only betadpo --ep $ep --artifacts $art"
        continue
      fi
      mem="$OUT/$tag.mem"
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 >"$mem.base"
      : >"$mem"
      sample_memory "$mem" &
      sampler=$!
      # shellcheck disable=SC2086
      "$PYTHON" scripts/bench/bench_vs_pytorch.py $margs $common --only betadpo --ep "$ep" --artifacts "$art" \
        --betadpo "$BIN" --json "$OUT/$tag.json" >"$OUT/$tag.log" 2>&1 || note "$tag failed; see $OUT/$tag.log"
      kill "$sampler" 2>/dev/null || true
      wait "$sampler" 2>/dev/null || true
    done
  done
done

fi # SUMMARY_ONLY

# ---------------------------------------------------------------------------------------------- table
"$PYTHON" - "$OUT" "$MODELS" "$STEPS" <<'EOF'
import glob, json, os, sys
out, models, steps = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])

def load(tag):
    path = os.path.join(out, tag + ".json")
    return json.load(open(path)) if os.path.exists(path) else None

def peak_mem_mib(tag, side):
    if side.get("gpu_peak_bytes"):
        return side["gpu_peak_bytes"] / 2**20
    mem = os.path.join(out, tag + ".mem")
    if not os.path.exists(mem) or not os.path.exists(mem + ".base"):
        return None
    vals = [int(l) for l in open(mem) if l.strip().isdigit()]
    base = int(open(mem + ".base").read().split()[0])
    return max(vals) - base if vals else None

def losses(result, side):
    runs = result.get("runs", {}).get(side, [])
    return [s["loss"] for s in runs[0]["steps"]] if runs and runs[0].get("steps") else []

print("\n| model | pairs | configuration | median step (s) | tokens/s | peak device memory (MiB) | first losses | max abs loss diff vs PyTorch fp32 eager |")
print("|---|---|---|---|---|---|---|---|")
for model in models:
    tags = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(out, model + ".*.json")))
    ref = load(model + ".torch-eager-fp32")
    for tag in tags:
        res = load(tag)
        which = "torch" if ".torch-" in tag else "betadpo"
        for r in res.get("results", []):
            side = r.get("sides", {}).get(which, {})
            if "median_step_s" not in side:
                print(f"| {model} | {r.get('pairs')} | {tag.split('.', 1)[1]} | failed | | | | |")
                continue
            mem = peak_mem_mib(tag, side)
            ls = losses(r, which)
            diff = "-"
            if ref:
                rr = [x for x in ref.get("results", []) if x.get("pairs") == r.get("pairs")]
                rl = losses(rr[0], "torch") if rr else []
                n = min(len(rl), len(ls))
                if n and tag != model + ".torch-eager-fp32":
                    diff = f"{max(abs(a - b) for a, b in zip(rl[:n], ls[:n])):.2e} over {n} steps"
            print(f"| {model} | {r.get('pairs')} | {tag.split('.', 1)[1]} | {side['median_step_s']:.4f} | "
                  f"{side.get('tokens_per_s', 0):.0f} | {f'{mem:.0f}' if mem is not None else '-'} | "
                  f"{' '.join(f'{x:.4f}' for x in ls[:3])} | {diff} |")
if not any(glob.glob(os.path.join(out, m + ".*.json")) for m in models):
    print("(no results in", out + ")")
EOF
