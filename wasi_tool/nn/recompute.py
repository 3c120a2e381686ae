"""Recompute instead of save: a module's forward whose saved tensors are rebuilt in backward.

``recompute_(module)`` swaps the module's class for a subclass whose forward runs under
saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``): autograd keeps only the
region's inputs and a placeholder for each tensor the region's ops save; the first placeholder
unpacked in backward runs the region's forward again and hands out what that replay saved, one
tensor per placeholder, each released once it is used. This is what
``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` does (without its early stop), written
here because torch's imports all of torch._dynamo at its first call: 0.16 GB resident under
every run that recomputes and compiles nothing (issue 34). The state dict, the module names
and eval-mode forward are unchanged; ``undo_recompute_`` restores the class.

Exactness: the CPU RNG state and CPU autocast are restored for the replay (dropout and
drop-path draw the same masks); the replay must save the same tensors in the same order, or
the backward stops with an error; a WASI/ASI layer inside a region does not advance its
activation subspace a second time: its first forward records the compression (core and bases)
and the replay uses that record (``replaying()``). The whole region is replayed, so every
record is consumed in the same backward.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from wasi_tool.errors import WasiToolError
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


class _Region:
    """One call of a recomputing module: its inputs, the RNG and autocast state its forward
    ran with, and (after a replay) the tensors the replay saved, by placeholder index."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.rng = torch.get_rng_state()
        self.autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        self.shapes: list[tuple[torch.Size, torch.dtype]] = []
        self.rebuilt: dict[int, torch.Tensor] = {}
        self.used: set[int] = set()

    def pack(self, t: torch.Tensor) -> tuple[_Region, int]:
        self.shapes.append((t.shape, t.dtype))
        return self, len(self.shapes) - 1

    def unpack(self, index: int) -> torch.Tensor:
        if index not in self.rebuilt:
            if index in self.used:  # a second backward through the same graph (retain_graph)
                self.used.clear()
            self.replay()
        self.used.add(index)
        return self.rebuilt.pop(index)  # released once autograd has used it

    def replay(self) -> None:
        """Run the region's forward again, keeping what it saves."""
        rebuilt: list[torch.Tensor] = []

        def keep(t: torch.Tensor) -> None:
            rebuilt.append(t.detach() if t.requires_grad else t)

        def never(_: None) -> torch.Tensor:  # the replay's own graph is never backwarded
            raise WasiToolError("internal error: a recompute replay's graph was backwarded")

        copies: dict[int, torch.Tensor] = {}

        def fresh(a: Any) -> Any:  # one copy per tensor: an argument given twice stays one
            if isinstance(a, torch.Tensor):
                if id(a) not in copies:
                    copies[id(a)] = a.detach().requires_grad_(a.requires_grad)
                return copies[id(a)]
            return a

        args = tuple(fresh(a) for a in self.args)
        kwargs = {k: fresh(v) for k, v in self.kwargs.items()}
        state = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        try:
            with (
                torch.enable_grad(),
                torch.autocast("cpu", enabled=self.autocast[0], dtype=self.autocast[1]),
                _inside("replay"),
                torch.autograd.graph.saved_tensors_hooks(keep, never),
            ):
                self.fn(*args, **kwargs)
        finally:
            torch.set_rng_state(state)
        found = [(t.shape, t.dtype) for t in rebuilt]
        if found != self.shapes:
            raise WasiToolError(
                f"recompute: the replay of {getattr(self.fn, '__qualname__', self.fn)} saved "
                f"{len(found)} tensors where its forward saved {len(self.shapes)}, or of other "
                "shapes: its forward must do the same work when run again"
            )
        self.rebuilt = {i: t for i, t in enumerate(rebuilt) if i not in self.used}


def _unpack(handle: tuple[_Region, int]) -> torch.Tensor:
    region, index = handle
    return region.unpack(index)


def run_recomputed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with nothing saved for backward but its inputs; backward runs
    it again (see the module docstring)."""
    region = _Region(fn, args, kwargs)
    with _inside("record"), torch.autograd.graph.saved_tensors_hooks(region.pack, _unpack):
        return fn(*args, **kwargs)


@contextlib.contextmanager
def recompute_in_eval() -> Iterator[None]:
    """Recompute regions recompute in eval mode too (a measurement's backward in eval mode,
    e.g. the memory plan's gradient-error probe, holds no more than training would)."""
    with _inside("eval"):
        yield


class RecomputeMixin(nn.Module):
    """Put in front of a module's class: forward with its saved tensors rebuilt in backward."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        parent = super().forward
        active = self.training or _depth("eval") > 0
        if not (active and torch.is_grad_enabled()) or not _needs_grad(self, args):
            return parent(*args, **kwargs)
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                count_kept(a)  # what the region keeps for its replay
        return run_recomputed(parent, *args, **kwargs)


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
