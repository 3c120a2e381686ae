"""wasi-tool: fine-tune pretrained transformers on edge CPUs with a fraction of the memory.

The names below load lazily (PEP 562), so ``import wasi_tool.errors`` or the CLI's startup does
not pay for torch, timm and the rest until they are used (nor ``__version__`` for
importlib.metadata's scan of the installed packages).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from wasi_tool.errors import WasiToolError

_LAZY = {
    "__version__": "wasi_tool._version",
    "CompressConfig": "wasi_tool.transforms.compress",
    "CompressReport": "wasi_tool.transforms.compress",
    "compress_": "wasi_tool.transforms.compress",
    "merge_": "wasi_tool.transforms.merge",
    "FactoredLinear": "wasi_tool.nn.factored",
    "ModelSource": "wasi_tool.models.loading",
    "load_model": "wasi_tool.models.loading",
    "run_compress": "wasi_tool.stages.compress",
    "prepare": "wasi_tool.api",
    "save_artifact": "wasi_tool.api",
    "PrepareReport": "wasi_tool.api",
}

if TYPE_CHECKING:
    from wasi_tool._version import __version__
    from wasi_tool.api import PrepareReport, prepare, save_artifact
    from wasi_tool.models.loading import ModelSource, load_model
    from wasi_tool.nn.factored import FactoredLinear
    from wasi_tool.stages.compress import run_compress
    from wasi_tool.transforms.compress import CompressConfig, CompressReport, compress_
    from wasi_tool.transforms.merge import merge_


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wasi_tool' has no attribute {name!r}")


__all__ = [
    "CompressConfig",
    "CompressReport",
    "FactoredLinear",
    "ModelSource",
    "PrepareReport",
    "WasiToolError",
    "__version__",
    "compress_",
    "load_model",
    "merge_",
    "prepare",
    "run_compress",
    "save_artifact",
]
