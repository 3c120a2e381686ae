"""Modules: factored and subspace-trained linears, and the swap helper."""

from wasi_tool.nn.factored import FactoredLinear
from wasi_tool.nn.subspace import ActivationBases, ASILinear, WASILinear
from wasi_tool.nn.swap import set_submodule

__all__ = ["ASILinear", "ActivationBases", "FactoredLinear", "WASILinear", "set_submodule"]
