"""Measuring what a training step really costs: bytes saved for backward, peak RSS."""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
from torch import nn


class SavedBytesMeter:
    """Counts the bytes autograd saves for backward while active (one forward).

    Each storage is counted once; parameters are left out (they exist anyway). Bytes saved
    while one of the ``targets`` modules is running its forward are also counted apart.
    """

    def __init__(self, model: nn.Module, targets: Iterable[str] = ()) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.total = 0
        self.targets = 0
        self._depth = 0
        self._seen: set[int] = set()
        self._handles = []
        for name in targets:
            module = model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(self._enter_target))
            self._handles.append(module.register_forward_hook(self._leave_target))
        self._hooks: Any = None

    def _enter_target(self, *_: Any) -> None:
        self._depth += 1

    def _leave_target(self, *_: Any) -> None:
        self._depth -= 1

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.params and ptr not in self._seen:
            self._seen.add(ptr)
            self.total += storage.nbytes()
            if self._depth > 0:
                self.targets += storage.nbytes()
        return t

    def __enter__(self) -> SavedBytesMeter:
        self.total = self.targets = 0
        self._seen.clear()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._hooks.__exit__(exc_type, exc, tb)
        self._seen.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def pace(speedup: float) -> str:
    """A time ratio (baseline time / this time) in words: "1.66x faster" or "1.47x slower"."""
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"
