"""How many CPU threads torch's kernels use (``--threads``; the default is torch's own, one per
core). On a shared machine fewer threads than cores can be much faster: a digits fine-tune went
from 32 s to 17 min when its two threads competed with other jobs for two cores."""

from __future__ import annotations

from wasi_tool.errors import WasiToolError


def check_threads(threads: int | None) -> None:
    if threads is not None and not 1 <= threads <= 1024:
        raise WasiToolError(f"threads must be between 1 and 1024, got {threads}")


def use_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` (None: leave torch's default), here and, via
    OMP_NUM_THREADS, in the processes this one starts (the training bench's workers); the number
    in use after."""
    import os

    import torch

    check_threads(threads)
    if threads is not None:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return torch.get_num_threads()
