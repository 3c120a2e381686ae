"""Training methods: how to prepare a model and how to step it."""

from wasi_tool.methods.optim import SubspaceSGD
from wasi_tool.methods.registry import (
    METHODS,
    LayerOptions,
    Method,
    finalize_,
    get_method,
    prepare_,
)

__all__ = [
    "METHODS",
    "LayerOptions",
    "Method",
    "SubspaceSGD",
    "finalize_",
    "get_method",
    "prepare_",
]
