"""Modules: factored and (later) WASI linears, and the swap helper."""

from wasi_tool.nn.factored import FactoredLinear
from wasi_tool.nn.swap import set_submodule

__all__ = ["FactoredLinear", "set_submodule"]
