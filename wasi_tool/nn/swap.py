"""Replacing submodules by dotted name."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from wasi_tool.nn.fastpath import sync_fast_paths_

M = TypeVar("M", bound=nn.Module)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (e.g. ``blocks.0.mlp.fc1``) with ``module``.

    Inside PyTorch's nn.TransformerEncoderLayer / Encoder, their fused fast paths are declined
    while a linear is not an nn.Linear (and restored when it is again): nn/fastpath.py."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
    sync_fast_paths_(model, name)


def replace_all_(model: nn.Module, kind: type[M], make: Callable[[M], nn.Module]) -> int:
    """Replace every submodule of type ``kind`` with ``make(module)``; returns how many."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
    for name, module in found:
        set_submodule(model, name, make(module))
    return len(found)
