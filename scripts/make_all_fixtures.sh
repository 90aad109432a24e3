#!/usr/bin/env bash
# Regenerate every committed data / model fixture from scratch (deterministic; ~5 minutes on 2 cores):
#   graphs/quickstart/{train,test,test_conversational,test_implicit}.jsonl   scripts/make_prefs.py
#   graphs/quickstart/{tokenizer.json,tokenizer_config.json}                scripts/make_tokenizer.py
#   graphs/quickstart/model.onnx(+.data)     tiny random Llama, dynamo       scripts/export_hf.py --tiny llama
#   tests/fixtures/models/<family>/{model.onnx[,.data],golden.safetensors,golden.json,hf_export.json}
#                                             8 tiny random families         scripts/export_hf.py --tiny F --golden
#   tests/fixtures/models/{gpt2,llama,qwen2,gemma}/hf_reference.{json,safetensors}
#                                             transformers' checkpoint/logits scripts/make_hf_reference.py
# Not here: tests/fixtures/models/optimum-* (Hugging Face Optimum exports), made by
# scripts/make_optimum_fixtures.sh in virtual environments of their own (Optimum pins an older transformers).
# Usage: bash scripts/make_all_fixtures.sh [family ...]     (default: all families)
# Env:   PY=path/to/python (default scripts/.venv/bin/python; created with scripts/setup_venv.sh if missing)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PY:-scripts/.venv/bin/python}"
if [ ! -x "$PY" ]; then
  bash scripts/setup_venv.sh
fi
families=("$@")
if [ ${#families[@]} -eq 0 ]; then
  families=(gpt2 llama mistral qwen2 gpt_neox opt phi3 gemma)
fi
export PYTHONWARNINGS=ignore

"$PY" scripts/make_prefs.py --out graphs/quickstart
"$PY" scripts/make_tokenizer.py --data graphs/quickstart --out graphs/quickstart

# exporters: gpt2, opt, phi3 with the TorchScript exporter (opset 17), the others with dynamo (opset 18);
# see DEFAULT_EXPORTER in export_hf.py
for fam in "${families[@]}"; do
  echo "=== tests/fixtures/models/$fam"
  "$PY" scripts/export_hf.py --tiny "$fam" --out "tests/fixtures/models/$fam" --golden \
    --test-jsonl graphs/quickstart/test.jsonl --tokenizer graphs/quickstart/tokenizer.json
done

hf_reference=()
for fam in "${families[@]}"; do
  case "$fam" in gpt2|llama|qwen2|gemma) hf_reference+=("$fam") ;; esac
done
if [ ${#hf_reference[@]} -gt 0 ]; then
  echo "=== hf_reference: ${hf_reference[*]}"
  "$PY" scripts/make_hf_reference.py "${hf_reference[@]}"
fi

echo "=== graphs/quickstart/model.onnx"
"$PY" scripts/export_hf.py --tiny llama --seed 7 --exporter dynamo --out graphs/quickstart
echo "all fixtures regenerated"
