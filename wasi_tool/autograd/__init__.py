"""torch.autograd.Function subclasses only; they call wasi_tool.ops."""

from wasi_tool.autograd.functions import (
    ASIFunction,
    ASIResidualFunction,
    GradSink,
    WASIFunction,
    WASIResidualFunction,
    WSIFunction,
)

__all__ = [
    "ASIFunction",
    "ASIResidualFunction",
    "GradSink",
    "WASIFunction",
    "WASIResidualFunction",
    "WSIFunction",
]
