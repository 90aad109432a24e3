#!/usr/bin/env bash
# Fills fuzz/corpus/onnx_loader with seed models: the quickstart Llama and the repository's fixture
# models, each with its external data inlined so that one input file is a whole model.
# Needs Python with `onnx` (as CI has).
set -euo pipefail
cd "$(dirname "$0")/.."
out=fuzz/corpus/onnx_loader
mkdir -p "$out"
python3 - "$out" graphs/quickstart/model.onnx tests/fixtures/models/*/model.onnx <<'PY'
import os, sys, onnx
out = sys.argv[1]
for path in sys.argv[2:]:
    name = os.path.basename(os.path.dirname(path))
    onnx.save(onnx.load(path), os.path.join(out, f"{name}.onnx"))  # onnx.load reads the external data
PY
ls -la "$out"
