"""Which memory allocator a training process runs on, so resident memory follows live memory.

A training step frees and reallocates the same large tensors every step. glibc's default
mmap threshold grows to the size of freed blocks, so after the first step large tensors come
from the heap, whose freed space stays resident: a ViT-B/32 step whose live tensors peak at
0.17 GB held 1.1 GB above its floor (benchmarks/e2e_step.py, BENCHMARKS.md).

Ways out, measured on that step (wasi, all 72 linears, memory mode ``block``; BENCHMARKS.md,
e2e_allocator; vanilla on glibc 4.7 s a step, 2.04 GB above its floor, in the same run):

- tcmalloc (gperftools) with its own settings: 0.53 GB, 3.3 s. "auto"'s first choice since
  2026-12-08: on an AMD EPYC machine, in one run, the same step took 4.57 s on tcmalloc against
  6.06 s on jemalloc (vanilla on glibc 7.11 s), at 0.39 vs 0.37 GB above the floor; jemalloc
  that never returns pages took 4.51 s at 0.41 GB, so its decay's purging costs most of the
  difference. ``TCMALLOC_AGGRESSIVE_DECOMMIT=true`` holds less but made the step 1.5x slower.
- jemalloc loaded with ``LD_PRELOAD`` and ``MALLOC_CONF=dirty_decay_ms:1000,muzzy_decay_ms:0``
  (freed pages go back to the system after a second unused): 0.48 GB above the floor, 3.5 s
  a step. Returning them at once (decay 0) holds 0.465 GB but made the step 6.4 s: every new
  tensor's pages fault in again. The second choice.
- Both must be loaded before the process starts, so the training bench starts its workers with
  one; ``finetune`` runs on one when the user starts wasi-tool with it (README: "Resident
  memory that follows live memory"; scripts/demo.sh does).
- In a process already running on glibc, a fixed 64 KiB mmap threshold (``mallopt``) maps
  every large tensor and unmaps it on free: 0.47 GB above the floor, but 1.3-1.6x slower, as
  jemalloc with decay 0.

Intel's PyTorch CPU tuning guide recommends the same preload of tcmalloc or jemalloc for speed.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from wasi_tool.errors import WasiToolError
from wasi_tool.threads import wait_policy_env

ALLOCATORS = ("auto", "system", "tcmalloc", "jemalloc")

_LIBRARIES = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2",),
}
_PACKAGES = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}
_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/arm-linux-gnueabihf",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
# Settings beyond the preload, measured (module docstring): jemalloc returns pages unused for a
# second (its default keeps them 10 s; 0 returns them at once, 1.8x slower); tcmalloc's own.
JEMALLOC_CONF = "dirty_decay_ms:1000,muzzy_decay_ms:0"
_SETTINGS: dict[str, dict[str, str]] = {
    "tcmalloc": {},
    "jemalloc": {"MALLOC_CONF": JEMALLOC_CONF},
}
# "auto"'s order: the faster step at about the same peak first (module docstring)
AUTO_ORDER = ("tcmalloc", "jemalloc")


def check_allocator(choice: str) -> None:
    if choice not in ALLOCATORS:
        raise WasiToolError(f"allocator must be one of {', '.join(ALLOCATORS)}, got {choice!r}")


def find_library(name: str) -> Path | None:
    """The shared library of allocator ``name`` ("tcmalloc" or "jemalloc"), if installed."""
    if not sys.platform.startswith("linux"):
        return None
    dirs = [*os.environ.get("WASI_TOOL_ALLOCATOR_PATH", "").split(os.pathsep), *_DIRS]
    for directory in filter(None, dirs):
        for lib in _LIBRARIES[name]:
            path = Path(directory) / lib
            if path.is_file():
                return path
    return None


def in_use() -> str:
    """The allocator this process runs on: "tcmalloc", "jemalloc", or "glibc" ("system" off
    Linux), read from the libraries mapped into it."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name, libs in _LIBRARIES.items():
        if any(lib.split(".so")[0] in maps for lib in libs):
            return name
    return "glibc"


def worker_env(choice: str) -> tuple[dict[str, str], str]:
    """Environment variables that start a worker process on allocator ``choice``, and the
    allocator it names; beside them the OpenMP wait policy the worker's torch starts with
    (wasi_tool.threads.wait_policy_env: the user's OMP_WAIT_POLICY, else the tool's default).

    "auto" picks tcmalloc, else jemalloc, when one is installed, for every training worker
    (until 2026-12-08 only for runs that save memory: vanilla on tcmalloc steps as fast as on
    glibc at ViT-B/32 and holds less, 1.74 vs 2.07 GB above its floor, and at TinyLlama's
    shapes glibc's kept heap put wasi above vanilla: BENCHMARKS.md), and the system allocator
    otherwise; a named allocator that is not installed is an error.
    """
    env, name = _allocator_env(choice)
    return {**wait_policy_env(), **env}, name


def _allocator_env(choice: str) -> tuple[dict[str, str], str]:
    check_allocator(choice)
    if choice == "system":
        return {}, "system"
    names = AUTO_ORDER if choice == "auto" else (choice,)
    for name in names:
        lib = find_library(name)
        if lib is not None:
            preload = " ".join(filter(None, [str(lib), os.environ.get("LD_PRELOAD", "")]))
            # the user's own settings (say MALLOC_CONF) win over ours
            own = {k: v for k, v in _SETTINGS[name].items() if k not in os.environ}
            return {"LD_PRELOAD": preload, **own}, name
    if choice == "auto":
        return {}, "system"
    raise WasiToolError(
        f"allocator {choice} is not installed (on Debian or Raspberry Pi OS: "
        f"apt install {_PACKAGES[choice]})"
    )


def follow_live_memory() -> str:
    """Make resident memory follow live memory in this process, as far as its allocator
    allows; returns what it runs on ("tcmalloc", "jemalloc", "glibc, 64 KiB mmap threshold",
    or the allocator unchanged)."""
    name = in_use()
    if name != "glibc":
        return name
    try:
        fixed = bool(ctypes.CDLL("libc.so.6").mallopt(-3, 65536))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        fixed = False
    return "glibc, 64 KiB mmap threshold" if fixed else "glibc"


def release_free_memory() -> str:
    """Give the pages the allocator holds free back to the system now (after a collection of
    Python's cycles), so that what is resident is what is live: glibc ``malloc_trim(0)``,
    jemalloc's purge of every arena, tcmalloc's ``ReleaseFreeMemory``. Returns what it did
    ("" where nothing could). A run calls it once the model is prepared and before the floor
    is read (training/session.py): a preparation's freed temporaries (a calibration forward,
    the dense weights a factoring replaced) are otherwise still resident as training starts
    (jemalloc returns them only after its decay, and only when it next allocates; glibc keeps
    the top of its heap up to the trim threshold and every hole below it)."""
    import gc

    gc.collect()
    name = in_use()
    try:
        lib = ctypes.CDLL(None)
        if name == "jemalloc":
            arenas_all = b"arena.4096.purge"  # MALLCTL_ARENAS_ALL
            ok = lib.mallctl(arenas_all, None, None, None, ctypes.c_size_t(0)) == 0
            return "jemalloc purge" if ok else ""
        if name == "tcmalloc":
            lib.MallocExtension_ReleaseFreeMemory()
            return "tcmalloc release"
        if name == "glibc":
            ctypes.CDLL("libc.so.6").malloc_trim(ctypes.c_size_t(0))
            return "malloc_trim"
    except (OSError, AttributeError):
        return ""
    return ""
