#!/usr/bin/env bash
# Install, then (offline, no downloads): compress a random-init ViT-B/32, and fine-tune a small
# ViT with WASI on scikit-learn's digits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
wasi-tool compress --random-init --arch vit_base_patch32_224 --eps 0.8 \
  --out runs/demo-vit-b32 --overwrite --plot
wasi-tool finetune --random-init --arch vit_tiny_patch16_224 --img-size 32 --data digits \
  --method wasi --eps 0.9 --epochs 3 --batch-size 64 --out runs/demo-digits-wasi --overwrite
