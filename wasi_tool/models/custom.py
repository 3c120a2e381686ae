"""The user's own model classes: named by an import path, never run unless the user names it.

An artifact of a custom model records ``arch = "custom"`` and, in its model kwargs (JSON only),
the class path ``pkg.mod:Class``, the constructor keyword arguments and the example input's
shape and dtype. Rebuilding it imports and calls that class, so ``load_model`` does so only when
the caller passes the same path (``ModelSource.model_class``, ``--model-class``).
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import torch
from torch import nn

from wasi_tool.errors import WasiToolError

CUSTOM_ARCH = "custom"
MARK = "_wasi_custom"  # attribute holding the recorded kwargs on a custom model
_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def class_path(cls: type) -> str:
    """``module:QualName`` of ``cls``; a class from ``__main__`` or a function has none."""
    path = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise WasiToolError(
            f"{cls.__qualname__} is defined in {cls.__module__} (not importable by path): "
            "move it to a module and pass model_class='pkg.mod:Class'"
        )
    return path


def import_class(path: str) -> type[nn.Module]:
    """The nn.Module class at ``pkg.mod:Class`` (imports ``pkg.mod``: its code runs)."""
    if not isinstance(path, str) or not _PATH.match(path):
        raise WasiToolError(f"model class {path!r} is not an import path like pkg.mod:Class")
    module_name, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except ImportError as exc:
        raise WasiToolError(f"cannot import model class {path}: {exc}") from None
    except AttributeError:
        raise WasiToolError(f"cannot import model class {path}: no {qualname} there") from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise WasiToolError(f"model class {path} is not an nn.Module subclass")
    return obj


def check_named(recorded: str, given: str | None, where: str) -> None:
    """The user must name the class the artifact records before it is imported and run."""
    if given is None:
        raise WasiToolError(
            f"{where} holds a custom model {recorded}; rebuilding it runs that class's code: "
            f"pass --model-class {recorded} (model_class= in Python) if you trust it"
        )
    if given != recorded:
        raise WasiToolError(f"{where} holds a {recorded} model, not {given} (--model-class)")


def build_custom(kwargs: dict[str, Any]) -> nn.Module:
    """A new instance of the recorded class with the recorded constructor config."""
    cls = import_class(kwargs["model_class"])
    config = kwargs.get("config") or {}
    if not isinstance(config, dict):
        raise WasiToolError("the recorded model config is not a JSON object")
    try:
        model = cls(**config)
    except TypeError as exc:
        raise WasiToolError(f"cannot build {kwargs['model_class']}(**config): {exc}") from None
    mark_(model, kwargs)
    return model


def mark_(model: nn.Module, kwargs: dict[str, Any]) -> None:
    object.__setattr__(model, MARK, dict(kwargs))


def custom_kwargs(model: nn.Module) -> dict[str, Any] | None:
    found = getattr(model, MARK, None)
    return found if isinstance(found, dict) else None


def example_like(kwargs: dict[str, Any], batch: int, generator: torch.Generator | None) -> Any:
    """A random batch shaped like the recorded example input (ints below its recorded max)."""
    shape = [batch, *[int(d) for d in kwargs["input_shape"][1:]]]
    dtype = getattr(torch, str(kwargs.get("input_dtype", "float32")))
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=dtype)
    high = int(kwargs.get("input_max", 1)) + 1
    return torch.randint(0, high, shape, generator=generator, dtype=dtype)
