#!/usr/bin/env bash
# The main job: export the real SmolLM2-135M-Instruct with two real adapters into one package,
# answer the same prompts with no adapter, "pirate" and "shout" side by side; then the same
# package with the portable recipe (one 4-bit base, float adapters), checked against PyTorch + PEFT.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
BASE=$(python -c "from lora_edge.compile.realmodel import smollm2_gguf; print(smollm2_gguf())")
mkdir -p demo
lora-edge export "$BASE" -a pirate=examples/adapters/pirate -a shout=examples/adapters/shout -o demo/pkg --force
lora-edge inspect demo/pkg
for prompt in "What is the capital of Italy?" "What is snow?" "Why is the sea salty?"; do
  echo
  echo "> $prompt"
  lora-edge run demo/pkg -a none -a pirate -a shout --prompt "$prompt" -n 40
done
echo
lora-edge export "$BASE" -a pirate=examples/adapters/pirate -a shout=examples/adapters/shout -o demo/pkg-int4 --recipe portable --force
echo "> What is snow?   (int4 package)"
lora-edge run demo/pkg-int4 -a none -a pirate -a shout --prompt "What is snow?" -n 40
lora-edge verify demo/pkg-int4 --greedy-tokens 0
