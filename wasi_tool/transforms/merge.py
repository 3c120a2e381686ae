"""merge_: multiply every factored layer back out into a dense nn.Linear."""

from __future__ import annotations

from torch import nn

from wasi_tool.nn.factored import FactoredLinear
from wasi_tool.nn.swap import set_submodule


def merge_(model: nn.Module) -> int:
    """Replace every FactoredLinear with a dense nn.Linear of weight L R; returns how many."""
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, FactoredLinear):
            set_submodule(model, name, module.to_linear())
            merged += 1
    return merged
