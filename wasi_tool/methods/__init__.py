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
    methods_with,
    option_keys,
    options_classes,
    prepare_,
    register_method,
    unregister_method,
)
from wasi_tool.methods.bsr import BsrOptions
from wasi_tool.methods.lora import LoraOptions
from wasi_tool.methods.mezo import MezoOptions
from wasi_tool.methods.optim import SubspaceSGD
from wasi_tool.methods.options import MethodOptions

__all__ = [
    "METHODS",
    "BsrOptions",
    "LayerOptions",
    "LoraOptions",
    "Method",
    "MethodOptions",
    "MezoOptions",
    "NonFiniteLoss",
    "StepOutput",
    "SubspaceSGD",
    "finalize_",
    "get_method",
    "gradient_step",
    "methods_with",
    "option_keys",
    "options_classes",
    "prepare_",
    "register_method",
    "unregister_method",
]
