#!/usr/bin/env bash
# Install, then run the offline demo recipe (pipelines/demo.toml): pretrain a small ViT on
# digits 0-4, compress it, fine-tune on digits 5-9 with WASI and vanilla, export, bench, report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Memory-saving stages run best on an allocator that hands freed pages back (README, "Resident
# memory that follows live memory"): jemalloc (pages unused for a second go back), else
# tcmalloc, when installed (apt install libjemalloc2).
JEMALLOC=$(ls /usr/lib/*/libjemalloc.so.2 2>/dev/null | head -n 1 || true)
TCMALLOC=$(ls /usr/lib/*/libtcmalloc_minimal.so.4 2>/dev/null | head -n 1 || true)
if [ -n "$JEMALLOC" ]; then
  export LD_PRELOAD="$JEMALLOC${LD_PRELOAD:+ $LD_PRELOAD}"
  export MALLOC_CONF="${MALLOC_CONF:-dirty_decay_ms:1000,muzzy_decay_ms:0}"
elif [ -n "$TCMALLOC" ]; then
  export LD_PRELOAD="$TCMALLOC${LD_PRELOAD:+ $LD_PRELOAD}"
fi
wasi-tool run pipelines/demo.toml --out runs/demo
