#!/usr/bin/env bash
# Install, then run the offline demo recipe (pipelines/demo.toml): pretrain a small ViT on
# digits 0-4, compress it, fine-tune on digits 5-9 with WASI and vanilla, export, bench, report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Memory-saving stages run best on an allocator that hands freed pages back (README, "Resident
# memory that follows live memory"): use tcmalloc when it is installed.
TCMALLOC=$(ls /usr/lib/*/libtcmalloc_minimal.so.4 2>/dev/null | head -n 1 || true)
if [ -n "$TCMALLOC" ]; then
  export LD_PRELOAD="$TCMALLOC${LD_PRELOAD:+ $LD_PRELOAD}"
fi
wasi-tool run pipelines/demo.toml --out runs/demo
