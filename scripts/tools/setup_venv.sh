#!/usr/bin/env bash
# Create scripts/.venv with everything the fixture/export scripts need.
# Usage: bash scripts/tools/setup_venv.sh            (idempotent; re-running only upgrades nothing)
# Env:   PYTHON=python3.11   interpreter used to create the venv
#        TORCH_SPEC="torch"  e.g. "torch==2.9.1" to pin; the default PyPI wheel works (CPU use only)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$(dirname "$here")/.venv"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch}"
if [ ! -x "$venv/bin/python" ]; then
  "$PYTHON" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --upgrade pip >/dev/null
"$venv/bin/python" -m pip install -r "$here/requirements.txt" "$TORCH_SPEC"
"$venv/bin/python" - <<'PY'
import torch, transformers, onnx, onnxscript, onnxruntime, safetensors, tokenizers, numpy
print("torch", torch.__version__, "| transformers", transformers.__version__, "| onnx", onnx.__version__,
      "| onnxscript", onnxscript.__version__, "| onnxruntime", onnxruntime.__version__,
      "| tokenizers", tokenizers.__version__, "| numpy", numpy.__version__)
PY
echo "venv ready: $venv (activate with: source scripts/.venv/bin/activate)"
