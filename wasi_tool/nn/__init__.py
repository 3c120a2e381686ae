"""Modules: factored and subspace-trained linears, token dropping, and the swap helper."""

from wasi_tool.nn.factored import FactoredLinear
from wasi_tool.nn.subspace import ActivationBases, ASILinear, SubspaceLayer, WASILinear, to_plain_
from wasi_tool.nn.swap import set_submodule
from wasi_tool.nn.token_drop import TokenDropBlock, enable_token_drop_, token_drop_spec

__all__ = [
    "ASILinear",
    "ActivationBases",
    "FactoredLinear",
    "SubspaceLayer",
    "TokenDropBlock",
    "WASILinear",
    "enable_token_drop_",
    "set_submodule",
    "to_plain_",
    "token_drop_spec",
]
