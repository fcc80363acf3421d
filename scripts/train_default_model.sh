#!/usr/bin/env bash
# Reproduces the embedded default model models/monet-vd-books from scratch:
# corpus (Debian packages) -> SentencePiece tokenizer -> `monet train` -> models/.
# About an hour on 2 CPU cores. Usage: bash scripts/train_default_model.sh [OUT_MODEL_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-models/monet-vd-books}"
[ -x build/monet ] || bash scripts/build.sh
[ -x .venv/bin/python ] || bash scripts/deps.sh
bash scripts/fetch_corpus.sh data/corpus
.venv/bin/python scripts/train_tokenizer.py data/corpus data/tokenizer
run=data/train-default
if [ -d "$run" ] && ls "$run"/step-* >/dev/null 2>&1; then resume=--resume; else resume=; fi
build/monet train --data data/corpus --tokenizer data/tokenizer --out "$run" $resume \
  --hidden 256 --layers 8 --heads 4 --kv-heads 4 --max-pos 512 \
  --experts 64 --moe-heads 4 --moe-dim 16 --topk 8 --groups 2 \
  --steps 2400 --batch 4 --seq 512 --lr 2e-3 --warmup 100 --min-lr-ratio 0.1 --aux-weight 0.1 \
  --eval-every 200 --val-tokens 16384 --save-every 200 --keep 2 --save-dtype bf16 --seed 1234 --threads 2 --log-every 20
final=$(ls -d "$run"/step-* | sort | tail -1)
mkdir -p "$dest"
for f in config.json model.safetensors tokenizer.model tokenizer.json tokenizer_config.json special_tokens_map.json; do
  cp "$final/$f" "$dest/$f"
done
cp "$run/train.csv" "$dest/train.csv"
build/monet plot-loss "$run/train.csv" --out "$dest/loss.png" --smooth 0.9 --title "monet-vd-books training"
echo "default model written to $dest (from $final)"
