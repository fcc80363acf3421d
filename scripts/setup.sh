#!/usr/bin/env bash
# Set-up and main job: install dependencies, build, then run the embedded
# default model (models/monet-vd-books, trained by `monet train`): generate
# text and show which experts fire on each token.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
bash scripts/build.sh
bash scripts/build_python.sh   # the Python package `monet`, installed into .venv
build/monet info
echo "--- generate (a sampled continuation of the prompt) ---"
build/monet generate -p "It was a fine morning, and Elizabeth" -n 60 --temperature 0.7 --top-p 0.9 --seed 7
echo
echo "--- experts of each token, per router group ---"
build/monet experts -p "The whale swam towards the ship" --top 3
echo "--- the same model from Python (.venv/bin/python) ---"
.venv/bin/python -c "import monet; print(monet.Model().generate('Once', max_tokens=8, temperature=0).text)"
