#!/usr/bin/env bash
# Install, then run the offline demo recipe (pipelines/demo.toml): pretrain a small ViT on
# digits 0-4, compress it, fine-tune on digits 5-9 with WASI and vanilla, export, bench, report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
wasi-tool run pipelines/demo.toml --out runs/demo
