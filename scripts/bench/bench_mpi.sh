#!/usr/bin/env bash
# Step time of data-parallel training on one machine: one process with 2 threads against 2 MPI
# ranks with 1 thread each, the same global batch, and the gradient allreduce's share of a step.
#
#   scripts/bench/bench_mpi.sh MODEL_DIR DATA.jsonl [STEPS] [BATCH] [MAX_LENGTH]
#
# MODEL_DIR holds an exported model.onnx and tokenizer.json (e.g. SmolLM2-135M). Needs mpirun and
# target/mpi/betadpo (scripts/ci/build_mpi.sh); BETADPO_BIN picks another binary (a release build).
# Prints, per setup, the mean step time and allreduce time over steps 2..STEPS (the first step
# includes warm-up). Scratch files go to $WORK (default: a new temporary directory, removed after).
set -euo pipefail
model_dir=$1 data=$2 steps=${3:-6} batch=${4:-8} max_length=${5:-256}
bin=${BETADPO_BIN:-$(cd "$(dirname "$0")/../.." && pwd)/target/mpi/betadpo}
work=${WORK:-$(mktemp -d)}
[ -n "${WORK:-}" ] || trap 'rm -rf "$work"' EXIT

"$bin" build-graph --model "$model_dir/model.onnx" --out "$work/art" >/dev/null
common=(train --artifacts "$work/art" --data "$data" --tokenizer "$model_dir/tokenizer.json"
  --batch-size "$batch" --max-length "$max_length" --max-steps "$steps" --save-every 0 --quiet)

summary() {
  python3 - "$1" "$2" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[2] + "/metrics.jsonl") if '"loss"' in l][1:]
mean = lambda k: sum(r.get(k, 0.0) for r in recs) / max(len(recs), 1)
print(f"{sys.argv[1]:<28} step {mean('step_time_s'):.3f} s  (train graph {mean('train_graph_time_s'):.3f} s, "
      f"allreduce {mean('allreduce_time_s'):.3f} s, optimizer {mean('optimizer_time_s'):.3f} s) over {len(recs)} steps")
PY
}

"$bin" "${common[@]}" --threads 2 --out "$work/one" >/dev/null
summary "1 process x 2 threads" "$work/one"
mpirun --allow-run-as-root --bind-to core -np 2 "$bin" "${common[@]}" --threads 1 --out "$work/two" >/dev/null
summary "2 ranks x 1 thread" "$work/two"
