"""The user's own model classes: named by an import path, never run unless the user names it.

An artifact of a custom model records ``arch = "custom"`` and, in its model kwargs (JSON only),
the class path ``pkg.mod:Class``, the constructor keyword arguments and the example input's
shape and dtype. Rebuilding it imports and calls that class, so ``load_model`` does so only when
the caller passes the same path (``ModelSource.model_class``, ``--model-class``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class CustomRecord:
    """What an artifact records to rebuild a user's model (its ``model_kwargs``, JSON): the
    class path, the constructor's keyword arguments (``config``, the user's JSON), and the
    example input's shape, dtype and (integer inputs) largest value."""

    model_class: str
    config: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()
    input_dtype: str = "float32"
    input_max: int | None = None

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, object]) -> CustomRecord:
        """The record of recorded ``model_kwargs``; a WasiToolError when it is malformed."""
        config = kwargs.get("config") or {}
        if not isinstance(config, dict):
            raise WasiToolError("the recorded model config is not a JSON object")
        path, shape = kwargs.get("model_class"), kwargs.get("input_shape")
        dtype, high = kwargs.get("input_dtype", "float32"), kwargs.get("input_max")
        if (
            not isinstance(path, str)
            or not isinstance(shape, (list, tuple))
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or not isinstance(dtype, str)
            or not (high is None or (isinstance(high, int) and not isinstance(high, bool)))
        ):
            raise WasiToolError(
                "malformed custom model record: model_class (pkg.mod:Class), input_shape "
                "(a list of ints), input_dtype and input_max are expected"
            )
        return cls(path, dict(config), tuple(shape), dtype, high)

    def to_kwargs(self) -> dict[str, object]:
        """The JSON form recorded as the artifact's ``model_kwargs``."""
        kwargs: dict[str, object] = {
            "model_class": self.model_class,
            "config": self.config,
            "input_shape": list(self.input_shape),
            "input_dtype": self.input_dtype,
        }
        if self.input_max is not None:
            kwargs["input_max"] = self.input_max
        return kwargs


def build_custom(record: CustomRecord) -> nn.Module:
    """A new instance of the recorded class with the recorded constructor config."""
    cls = import_class(record.model_class)
    try:
        model = cls(**record.config)
    except TypeError as exc:
        raise WasiToolError(f"cannot build {record.model_class}(**config): {exc}") from None
    mark_(model, record)
    return model


def mark_(model: nn.Module, record: CustomRecord) -> None:
    object.__setattr__(model, MARK, record)


def record_of(model: nn.Module) -> CustomRecord | None:
    """The record a custom model was built or saved with (None: not a marked custom model)."""
    found = getattr(model, MARK, None)
    return found if isinstance(found, CustomRecord) else None


def example_like(
    record: CustomRecord, batch: int, generator: torch.Generator | None
) -> torch.Tensor:
    """A random batch shaped like the recorded example input (ints below its recorded max)."""
    shape = [batch, *record.input_shape[1:]]
    dtype = getattr(torch, record.input_dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=dtype)
    high = int(record.input_max or 1) + 1
    return torch.randint(0, high, shape, generator=generator, dtype=dtype)
