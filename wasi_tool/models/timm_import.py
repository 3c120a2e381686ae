"""timm, imported without torch._dynamo (issue 34: the floor under a memory budget).

Every import of timm in wasi_tool goes through ``import_timm()``. What is deferred is
documented there; nothing changes for a run that compiles (torch.compile imports the real
modules, and the deferred decorators apply the real ``torch.compiler.disable`` on first call).
"""

from __future__ import annotations

import functools
import sys
import types
from typing import Any

_DYNAMO_UTILS = "torch._dynamo.utils"


def import_timm() -> Any:
    """timm, imported without torch._dynamo when nothing has imported it yet.

    timm imports torchvision.ops, whose roi_align imports ``is_compile_supported`` from
    torch._dynamo.utils at import time, and so all of torch._dynamo: 0.16 GB resident
    (0.08 GB anonymous) for a function only roi_align on a compiled path calls, in a process
    that trains a timm model with neither (issue 34: the floor under a memory budget); and
    timm's own ``disable_compiler`` (torch.compiler.disable, which imports torch._dynamo) wraps
    a few methods as their modules import. While timm imports, that module is a stand-in whose
    names import the real one when first used, and torch.compiler.disable a decorator that
    applies the real one when the function is first called (the same under torch.compile,
    which calls it; nothing in eager mode).
    """
    if "timm" in sys.modules or "torch._dynamo" in sys.modules:
        import timm

        return timm
    stub = types.ModuleType(_DYNAMO_UTILS)

    def real() -> Any:
        if sys.modules.get(_DYNAMO_UTILS) is stub:
            del sys.modules[_DYNAMO_UTILS]
        import torch._dynamo.utils as utils

        return utils

    def is_compile_supported(device_type: Any) -> Any:
        return real().is_compile_supported(device_type)

    stub.is_compile_supported = is_compile_supported  # type: ignore[attr-defined]

    def getattr_(name: str) -> Any:
        if name.startswith("__"):  # inspect probes every module's __file__: not a use
            raise AttributeError(name)
        return getattr(real(), name)

    stub.__getattr__ = getattr_  # type: ignore[method-assign]
    import torch.compiler

    eager_disable = torch.compiler.disable
    sys.modules[_DYNAMO_UTILS] = stub
    torch.compiler.disable = _deferred_disable
    try:
        import timm
    finally:
        torch.compiler.disable = eager_disable
        if sys.modules.get(_DYNAMO_UTILS) is stub:
            del sys.modules[_DYNAMO_UTILS]
    return timm


def _deferred_disable(fn: Any = None, recursive: bool = True, **kwargs: Any) -> Any:
    """torch.compiler.disable, applied when ``fn`` is first called (import_timm)."""
    if fn is None:
        return lambda f: _deferred_disable(f, recursive, **kwargs)
    done: list[Any] = []

    @functools.wraps(fn)
    def call(*args: Any, **kw: Any) -> Any:
        if not done:
            import torch.compiler

            done.append(torch.compiler.disable(fn, recursive=recursive, **kwargs))
        return done[0](*args, **kw)

    return call
