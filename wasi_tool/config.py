"""What every stage config shares: a versioned plain-dict round trip from an allow-list.

``to_dict`` writes the fields plus ``config_version``; ``from_dict`` rejects unknown keys and
versions newer than the code, and ``load_config`` rebuilds a config only from the classes
registered here (never by importing a name found in a file).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from wasi_tool.errors import WasiToolError

C = TypeVar("C", bound="StageConfig")
VERSION_KEY = "config_version"
CONFIGS: dict[str, type[StageConfig]] = {}


class StageConfig:
    """Mixin for ``@dataclass`` stage configs; ``stage`` names the stage in messages and in
    the allow-list, ``version`` is bumped when a field changes meaning."""

    stage: ClassVar[str] = "stage"
    version: ClassVar[int] = 1

    def settings(self) -> dict[str, object]:
        """The settings as plain values under their keys (``setting_hints``): by default the
        fields; a config holding a method's options object writes them flat."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_dict(self) -> dict[str, Any]:
        return {**self.settings(), VERSION_KEY: self.version}

    @classmethod
    def setting_hints(cls) -> dict[str, object]:
        """The keys a recipe, a settings file or ``from_dict`` may give, and their types (by
        default the fields)."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def from_settings(cls: type[C], data: Mapping[str, object]) -> C:
        """The config from its settings (``setting_hints``' keys; by default its fields)."""
        return cls(**data)

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, object]) -> C:
        """Rebuild a config from its settings; unknown keys are an error, never imported."""
        data = dict(data)
        version = data.pop(VERSION_KEY, cls.version)
        if not isinstance(version, int) or not 1 <= version <= cls.version:
            raise WasiToolError(
                f"{cls.stage} settings have {VERSION_KEY} {version!r}; this wasi-tool reads "
                f"1..{cls.version}"
            )
        unknown = set(data) - set(cls.setting_hints())
        if unknown:
            raise WasiToolError(f"unknown {cls.stage} setting(s): {', '.join(sorted(unknown))}")
        try:
            return cls.from_settings(data)
        except TypeError as exc:
            raise WasiToolError(f"bad {cls.stage} settings: {exc}") from None


def register_config(cls: type[C]) -> type[C]:
    """Class decorator: allow ``load_config`` to rebuild ``cls`` by its ``stage`` name."""
    if cls.stage in CONFIGS and CONFIGS[cls.stage] is not cls:
        raise ValueError(f"a config for stage {cls.stage!r} is already registered")
    CONFIGS[cls.stage] = cls
    return cls


def load_config(stage: str, data: Mapping[str, object]) -> StageConfig:
    """The config of ``stage`` from a dict, through the allow-list only."""
    try:
        cls = CONFIGS[stage]
    except KeyError:
        raise WasiToolError(f"no settings of a stage {stage!r} can be read") from None
    return cls.from_dict(data)


MAX_INT = 2**63  # settings read from a file are bounded: |int| below this, floats finite


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (parsed from JSON or TOML) has the type a config field declares, with
    bounded numbers (finite floats, integers below 2**63); a type form this does not know is
    accepted (the config's own validation still runs)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) < MAX_INT
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return abs(value) < MAX_INT if isinstance(value, int) else math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, list | tuple) and all(fits(v, args[0]) for v in value if args)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    return True


def type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check_settings(cls: type, data: object, where: str) -> dict[str, object]:
    """``data`` read from a file as the settings of config ``cls``: an object at the top,
    known keys only, each value of its field's type with bounded numbers. Returns it as a
    dict; raises a one-line WasiToolError naming the key, the type and the value."""
    if not isinstance(data, dict):
        raise WasiToolError(
            f"{where}: the settings must be an object of fields, got {type(data).__name__}"
        )
    if isinstance(cls, type) and issubclass(cls, StageConfig):
        hints = cls.setting_hints()
    else:
        types_of = typing.get_type_hints(cls)
        hints = {f.name: types_of[f.name] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key, value in data.items():
        if key == VERSION_KEY:
            continue
        if key not in hints:
            raise WasiToolError(f"{where}: unknown setting {key!r}")
        if not fits(value, hints[key]):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise WasiToolError(f"{where}: {key} takes {type_name(hints[key])}, got {shown}")
    return dict(data)
