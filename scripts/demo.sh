#!/usr/bin/env bash
# Install, then compress a randomly initialised ViT-B/32 (offline: no weights are downloaded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
wasi-tool compress --random-init --arch vit_base_patch32_224 --eps 0.8 \
  --out runs/demo-vit-b32 --overwrite --plot
