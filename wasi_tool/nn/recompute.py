"""Recompute instead of save: a module's forward under torch.utils.checkpoint (non-reentrant).

``recompute_(module)`` swaps the module's class for a subclass whose forward runs under
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: autograd keeps only the region's
inputs, and the region's forward runs again in backward to rebuild what it needs. The state
dict, the module names and eval-mode forward are unchanged; ``undo_recompute_`` restores the
class.

Exactness: the RNG state is saved and restored around the replay (dropout and drop-path draw
the same masks), and a WASI/ASI layer inside a region does not advance its activation subspace
a second time: its first forward records the compression (core and bases) and the replay uses
that record (``replaying()``). Early stopping of the replay is turned off so that every record
is consumed in the same backward.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.checkpoint as ckpt
from torch import nn

from wasi_tool.measure import count_kept

_local = threading.local()


def _depth(name: str) -> int:
    return int(getattr(_local, name, 0))


def recording() -> bool:
    """True inside the first forward of a recompute region (results are to be recorded)."""
    return _depth("record") > 0 and not replaying()


def replaying() -> bool:
    """True while a recompute region runs again in backward."""
    return _depth("replay") > 0


@contextlib.contextmanager
def _inside(name: str) -> Iterator[None]:
    setattr(_local, name, _depth(name) + 1)
    try:
        yield
    finally:
        setattr(_local, name, _depth(name) - 1)


def _contexts() -> tuple[
    contextlib.AbstractContextManager[Any], contextlib.AbstractContextManager[Any]
]:
    return _inside("record"), _inside("replay")


class RecomputeMixin(nn.Module):
    """Put in front of a module's class: forward under non-reentrant checkpointing."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        parent = super().forward
        if not (self.training and torch.is_grad_enabled()) or not _needs_grad(self, args):
            return parent(*args, **kwargs)
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                count_kept(a)  # what the region keeps for its replay
        with ckpt.set_checkpoint_early_stop(False):
            return ckpt.checkpoint(
                parent,
                *args,
                use_reentrant=False,
                preserve_rng_state=True,
                context_fn=_contexts,
                **kwargs,
            )


def _needs_grad(module: nn.Module, args: tuple[Any, ...]) -> bool:
    """Whether autograd would record anything in the region (a frozen prefix saves nothing, so
    it has nothing to recompute)."""
    if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return True
    return any(p.requires_grad for p in module.parameters())


_CLASSES: dict[type, type] = {}


def _recomputed(cls: type) -> type:
    if cls not in _CLASSES:
        name = f"Recompute{cls.__name__}"
        _CLASSES[cls] = type(name, (RecomputeMixin, cls), {"__module__": __name__})
    return _CLASSES[cls]


def recompute_(module: nn.Module) -> nn.Module:
    """Make ``module`` recompute in backward (in place; idempotent)."""
    if not isinstance(module, RecomputeMixin):
        module.__class__ = _recomputed(type(module))
    return module


def undo_recompute_(model: nn.Module) -> int:
    """Restore the original class of every recomputing module in ``model``; returns how many."""
    undone = 0
    for module in model.modules():
        if isinstance(module, RecomputeMixin):
            original = next(c for c in type(module).__mro__[1:] if c is not RecomputeMixin)
            module.__class__ = original
            undone += 1
    return undone


def recomputed(model: nn.Module) -> list[str]:
    """Names of the recomputing modules of ``model``."""
    return [n for n, m in model.named_modules() if isinstance(m, RecomputeMixin)]
