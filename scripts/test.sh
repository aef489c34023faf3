#!/usr/bin/env bash
# Install everything and run the whole test suite: tiny models and the real SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
