"""Training methods: one module each, registered by name in ``methods.base``.

Importing this package registers the built-in methods: vanilla, asi, wsi, wasi, bsr, bsr+wasi,
lora, mezo, asi-fixed and wasi-fixed.
"""

from wasi_tool.methods import asi, bsr, fixed, lora, mezo, vanilla, wasi, wsi  # noqa: F401  (registration)
from wasi_tool.methods.base import (
    METHODS,
    LayerOptions,
    Method,
    NonFiniteLoss,
    StepOutput,
    finalize_,
    get_method,
    gradient_step,
    prepare_,
    register_method,
    unregister_method,
)
from wasi_tool.methods.optim import SubspaceSGD

__all__ = [
    "METHODS",
    "LayerOptions",
    "Method",
    "NonFiniteLoss",
    "StepOutput",
    "SubspaceSGD",
    "finalize_",
    "get_method",
    "gradient_step",
    "prepare_",
    "register_method",
    "unregister_method",
]
