#!/usr/bin/env bash
# Hugging Face Optimum exports as test fixtures, with PyTorch goldens (~3 minutes on 2 cores, plus the
# first run's two virtual environments, ~5 GB each because PyPI's torch wheels bring CUDA libraries):
#   tests/fixtures/models/optimum-llama/              optimum-cli export onnx --task text-generation
#   tests/fixtures/models/optimum-llama-with-past/    ... --task text-generation-with-past (past_key_values.* in, present.* out)
#   tests/fixtures/models/optimum-gpt2-with-past/
#   tests/fixtures/models/optimum-llama-merged/       decoder_model_merged.onnx (an If on use_cache_branch), from
#   tests/fixtures/models/optimum-gpt2-merged/          optimum 1.27.0's --legacy export
# Each holds model.onnx (the merged decoder renamed), golden.safetensors and golden.json, as
# scripts/export_hf.py --golden writes them for the other families.
#
# The models are export_hf.py's tiny random llama and gpt2 (same configs and seeds), saved with
# save_pretrained by the Optimum environment's transformers, then exported by optimum-cli from that
# directory as a user would. Optimum pins an older transformers than scripts/.venv, so it gets its own
# virtual environment, created here when missing:
#   OPTIMUM_VENV         (default scripts/.venv-optimum)        optimum-onnx 0.1.0 (transformers 4.57, torch 2.15):
#                        today's exporter. It no longer writes decoder_model_merged.onnx for decoder-only
#                        models (it merges only encoder-decoder ones), hence the second environment:
#   OPTIMUM_LEGACY_VENV  (default scripts/.venv-optimum-legacy) optimum 1.27.0 (transformers 4.53, torch 2.8),
#                        the last release whose --legacy export writes decoder_model.onnx,
#                        decoder_with_past_model.onnx and their merge; it needs torch < 2.9 (it imports
#                        torch.onnx.symbolic_opset14._attention_scale, gone since).
# Usage: bash scripts/make_optimum_fixtures.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PYTHON="${PYTHON:-python3}"
OPTIMUM_VENV="${OPTIMUM_VENV:-scripts/.venv-optimum}"
OPTIMUM_LEGACY_VENV="${OPTIMUM_LEGACY_VENV:-scripts/.venv-optimum-legacy}"
export PYTHONWARNINGS=ignore

make_venv() {  # make_venv DIR PACKAGE...
  local dir="$1"
  shift
  if [ ! -x "$dir/bin/optimum-cli" ]; then
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install --upgrade pip >/dev/null
    "$dir/bin/python" -m pip install "$@"
  fi
}
make_venv "$OPTIMUM_VENV" "optimum-onnx[onnxruntime]==0.1.0" "optimum==2.1.0" "transformers==4.57.6" \
  "torch==2.15.0" safetensors tokenizers onnx onnxruntime numpy
make_venv "$OPTIMUM_LEGACY_VENV" "optimum[exporters]==1.27.0" "transformers==4.53.3" "torch==2.8.0"

version() {  # version VENV PACKAGE
  "$1/bin/python" -c "import importlib.metadata as m; print(m.version('$2'))"
}
current="optimum-onnx $(version "$OPTIMUM_VENV" optimum-onnx) (torch $(version "$OPTIMUM_VENV" torch), transformers $(version "$OPTIMUM_VENV" transformers))"
legacy="optimum $(version "$OPTIMUM_LEGACY_VENV" optimum) (torch $(version "$OPTIMUM_LEGACY_VENV" torch), transformers $(version "$OPTIMUM_LEGACY_VENV" transformers))"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

fixture() {  # fixture NAME FAMILY EXPORTED_ONNX DESCRIPTION
  local out="tests/fixtures/models/$1"
  echo "=== $out"
  rm -rf "$out"
  mkdir -p "$out"
  cp "$3" "$out/model.onnx"
  if [ -e "$3.data" ] || [ -e "${3}_data" ]; then
    echo "unexpected external data next to $3 (the fixtures are tiny)" >&2
    exit 1
  fi
  "$OPTIMUM_VENV/bin/python" scripts/optimum_fixtures.py golden --hf-dir "$work/hf-$2" --family "$2" --out "$out" \
    --exporter "$4"
}

export_current() {  # export_current FAMILY TASK
  "$OPTIMUM_VENV/bin/optimum-cli" export onnx --model "$work/hf-$1" --task "$2" "$work/$1-$2" \
    >"$work/$1-$2.log" 2>&1 || { cat "$work/$1-$2.log"; exit 1; }
}
for fam in llama gpt2; do
  "$OPTIMUM_VENV/bin/python" scripts/optimum_fixtures.py save --family "$fam" --out "$work/hf-$fam"
  "$OPTIMUM_LEGACY_VENV/bin/optimum-cli" export onnx --model "$work/hf-$fam" --task text-generation-with-past \
    --legacy "$work/$fam-legacy" >"$work/$fam-legacy.log" 2>&1 || { cat "$work/$fam-legacy.log"; exit 1; }
  export_current "$fam" text-generation-with-past
done
export_current llama text-generation

fixture optimum-llama llama "$work/llama-text-generation/model.onnx" \
  "$current: optimum-cli export onnx --task text-generation, model.onnx"
fixture optimum-llama-with-past llama "$work/llama-text-generation-with-past/model.onnx" \
  "$current: optimum-cli export onnx --task text-generation-with-past, model.onnx"
fixture optimum-gpt2-with-past gpt2 "$work/gpt2-text-generation-with-past/model.onnx" \
  "$current: optimum-cli export onnx --task text-generation-with-past, model.onnx"
fixture optimum-llama-merged llama "$work/llama-legacy/decoder_model_merged.onnx" \
  "$legacy: optimum-cli export onnx --task text-generation-with-past --legacy, decoder_model_merged.onnx"
fixture optimum-gpt2-merged gpt2 "$work/gpt2-legacy/decoder_model_merged.onnx" \
  "$legacy: optimum-cli export onnx --task text-generation-with-past --legacy, decoder_model_merged.onnx"
echo "optimum fixtures regenerated"
