"""merge_: multiply every factored layer back out into a dense nn.Linear."""

from __future__ import annotations

from torch import nn

from wasi_tool.nn.factored import FactoredLinear
from wasi_tool.nn.swap import replace_all_


def merge_(model: nn.Module) -> int:
    """Replace every FactoredLinear with a dense nn.Linear of weight L R; returns how many."""
    return replace_all_(model, FactoredLinear, lambda m: m.to_linear())
