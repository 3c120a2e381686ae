#!/usr/bin/env bash
# Install, then run the offline demo recipe (pipelines/demo.toml): pretrain a small ViT on
# digits 0-4, compress it, fine-tune on digits 5-9 with WASI and vanilla, export, bench, report.
#
#   bash scripts/demo.sh              # the whole demo
#   bash scripts/demo.sh --allocator  # only say which allocator the demo would run on
#
# Memory-saving stages run best on an allocator that hands freed pages back (docs/memory.md,
# "Resident memory that follows live memory"): tcmalloc, else jemalloc (pages unused for a
# second go back), when installed, as wasi_tool/allocator.py orders them. Without either the
# demo runs on glibc and says so in one line, with the command that installs tcmalloc.
set -euo pipefail
cd "$(dirname "$0")/.."

# Where the allocators' libraries are looked for: WASI_TOOL_ALLOCATOR_PATH (as the library reads
# it) first, then DEMO_ALLOCATOR_DIRS, which replaces the system's directories (tests set it).
allocator_dirs() {
  local extra=${WASI_TOOL_ALLOCATOR_PATH:-}
  echo "${extra//:/ } ${DEMO_ALLOCATOR_DIRS-/usr/lib/*-linux-gnu* /usr/lib64 /usr/lib /usr/local/lib}"
}

find_allocator_library() {  # $1: a library file name; prints its path, or nothing
  local dir
  for dir in $(allocator_dirs); do
    if [ -f "$dir/$1" ]; then
      echo "$dir/$1"
      return 0
    fi
  done
}

# Sets LD_PRELOAD (and jemalloc's MALLOC_CONF when it is the one) for what follows and prints one line naming the
# allocator: never an error, the demo runs on glibc when neither library is installed.
choose_allocator() {
  local jemalloc tcmalloc
  case "${LD_PRELOAD:-}" in
    *jemalloc*) echo "== allocator: jemalloc (already in LD_PRELOAD)"; return 0 ;;
    *tcmalloc*) echo "== allocator: tcmalloc (already in LD_PRELOAD)"; return 0 ;;
  esac
  jemalloc=$(find_allocator_library libjemalloc.so.2)
  tcmalloc=$(find_allocator_library libtcmalloc_minimal.so.4)
  if [ -n "$tcmalloc" ]; then
    export LD_PRELOAD="$tcmalloc${LD_PRELOAD:+ $LD_PRELOAD}"
    echo "== allocator: tcmalloc ($tcmalloc, preloaded)"
  elif [ -n "$jemalloc" ]; then
    export LD_PRELOAD="$jemalloc${LD_PRELOAD:+ $LD_PRELOAD}"
    export MALLOC_CONF="${MALLOC_CONF:-dirty_decay_ms:1000,muzzy_decay_ms:0}"
    echo "== allocator: jemalloc ($jemalloc, preloaded; MALLOC_CONF=$MALLOC_CONF)"
  else
    echo "== allocator: glibc (neither tcmalloc nor jemalloc is installed; memory-saving runs" \
      "hold more resident memory on glibc: sudo apt-get install libtcmalloc-minimal4)"
  fi
}

if [ "${1:-}" = "--allocator" ]; then
  choose_allocator
  exit 0
fi

bash scripts/install.sh
choose_allocator
wasi-tool run pipelines/demo.toml --out runs/demo
echo "== report: runs/demo/report/report.md (its memory table names each row's allocator)"
