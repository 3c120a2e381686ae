"""Lossy storage for backward, off by default: bfloat16 copies of what norms and GELUs save.

Outside the WASI layers, a ViT block saves each LayerNorm's input and each GELU's input in
fp32 for backward (ViT-B/32 at batch 32: 118 MB of norm inputs, 236 MB of GELU inputs). With
``lossy="bf16"`` those inputs are kept as bfloat16 (half the bytes, 8 mantissa bits) and cast
back to fp32 when backward needs them; everything else a norm saves (its mean and reciprocal
standard deviation, its weight) stays exact. The forward pass is unchanged, so only the
gradients through the norms and GELUs carry the rounding (relative error about 2**-9 per
element); benchmarks/accuracy.py measures what it does to accuracy.

A module inside a recompute region (nn/recompute.py) stores nothing of its own, so it is left
alone: with memory mode ``block`` there is nothing left to store lossily.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wasi_tool.measure import count_kept
from wasi_tool.nn.recompute import RecomputeMixin

LOSSY = ("off", "bf16")
_ATTR = "_wasi_lossy"


def _is_lossy_candidate(module: nn.Module) -> bool:
    """LayerNorms and GELUs (nn.GELU, Hugging Face's GELUActivation and its kin)."""
    return isinstance(module, nn.LayerNorm) or "gelu" in type(module).__name__.lower()


def lossy_modules(model: nn.Module, within: list[str]) -> list[str]:
    """Names of the norms and GELUs under the modules ``within`` (e.g. the blocks) that are not
    inside a recompute region."""
    names = []
    for root in within:
        stack: list[tuple[str, nn.Module]] = [(root, model.get_submodule(root))]
        while stack:
            name, module = stack.pop()
            if isinstance(module, RecomputeMixin):
                continue
            if _is_lossy_candidate(module):
                names.append(name)
                continue
            stack.extend((f"{name}.{n}", m) for n, m in module.named_children())
    return sorted(names)


class _Bf16Storage:
    """saved_tensors_hooks for one module call: fp32 tensors of the input's shape are kept as
    bfloat16; the rest as they are. Every kept tensor is counted by the active meter (these
    hooks shadow the meter's own)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.shape: torch.Size | None = None
        self.params: set[int] = set()
        self.hooks: Any = None

    def pack(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.dtype | None]:
        if (
            t.dtype == torch.float32
            and t.shape == self.shape
            and not isinstance(t, nn.Parameter)
            and t.untyped_storage().data_ptr() not in self.params
        ):
            kept = t.to(torch.bfloat16)
            count_kept(kept)
            return kept, torch.float32
        count_kept(t)
        return t, None

    @staticmethod
    def unpack(packed: tuple[torch.Tensor, torch.dtype | None]) -> torch.Tensor:
        t, dtype = packed
        return t if dtype is None else t.to(dtype)

    def enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not (module.training and torch.is_grad_enabled()) or not args:
            return
        first = args[0]
        if not isinstance(first, torch.Tensor):
            return
        self.shape = first.shape
        self.params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self.hooks.__enter__()

    def leave(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.hooks is not None:
            hooks, self.hooks = self.hooks, None
            hooks.__exit__(None, None, None)


def store_lossy_(model: nn.Module, names: list[str], kind: str = "bf16") -> int:
    """Keep what the modules ``names`` save for backward as ``kind`` (in place); returns how
    many modules. ``undo_lossy_`` removes it."""
    if kind not in LOSSY or kind == "off":
        raise ValueError(f"lossy storage kind must be 'bf16', got {kind!r}")
    for name in names:
        module = model.get_submodule(name)
        if hasattr(module, _ATTR):
            continue
        storage = _Bf16Storage(module)
        handles = (
            module.register_forward_pre_hook(storage.enter),
            module.register_forward_hook(storage.leave, always_call=True),
        )
        setattr(module, _ATTR, handles)
    return len(names)


def undo_lossy_(model: nn.Module) -> int:
    """Make every module of ``model`` store exactly again; returns how many changed."""
    undone = 0
    for module in model.modules():
        handles = module.__dict__.pop(_ATTR, None)
        if handles is not None:
            for h in handles:
                h.remove()
            undone += 1
    return undone


def stored_lossily(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` whose saved inputs are kept lossily."""
    return [n for n, m in model.named_modules() if hasattr(m, _ATTR)]
