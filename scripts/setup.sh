#!/usr/bin/env bash
# Set-up and main job: install dependencies, build, and run monet on a small
# random Monet checkpoint with a tokenizer (until a trained default model ships).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
bash scripts/build.sh
demo=build/demo-vd
if [ ! -f "$demo/config.json" ]; then
  PYTHONPATH=python .venv/bin/python -m monet_ref.make_checkpoint "$demo" --preset tiny-vd --dtype BF16 --tokenizer
fi
build/monet info --model "$demo"
build/monet forward --model "$demo" --ids 1,5,9,42 --out build/demo-forward.safetensors
echo "wrote build/demo-forward.safetensors (logits and router probabilities)"
echo "--- generate (random weights: expect gibberish) ---"
build/monet generate --model "$demo" -p "the other one" -n 24 --seed 1
echo "--- experts of each token ---"
build/monet experts --model "$demo" -p "the other one" --top 5
