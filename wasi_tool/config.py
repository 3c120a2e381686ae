"""What every stage config shares: a versioned plain-dict round trip from an allow-list.

``to_dict`` writes the fields plus ``config_version``; ``from_dict`` rejects unknown keys and
versions newer than the code, and ``load_config`` rebuilds a config only from the classes
registered here (never by importing a name found in a file).
"""

from __future__ import annotations

import dataclasses
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

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), VERSION_KEY: self.version}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Rebuild a config from its fields; unknown keys are an error, never imported."""
        data = dict(data)
        version = data.pop(VERSION_KEY, cls.version)
        if not isinstance(version, int) or not 1 <= version <= cls.version:
            raise WasiToolError(
                f"{cls.stage} settings have {VERSION_KEY} {version!r}; this wasi-tool reads "
                f"1..{cls.version}"
            )
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            raise WasiToolError(f"unknown {cls.stage} setting(s): {', '.join(sorted(unknown))}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise WasiToolError(f"bad {cls.stage} settings: {exc}") from None


def register_config(cls: type[C]) -> type[C]:
    """Class decorator: allow ``load_config`` to rebuild ``cls`` by its ``stage`` name."""
    if cls.stage in CONFIGS and CONFIGS[cls.stage] is not cls:
        raise ValueError(f"a config for stage {cls.stage!r} is already registered")
    CONFIGS[cls.stage] = cls
    return cls


def load_config(stage: str, data: dict[str, Any]) -> StageConfig:
    """The config of ``stage`` from a dict, through the allow-list only."""
    try:
        cls = CONFIGS[stage]
    except KeyError:
        raise WasiToolError(f"no settings of a stage {stage!r} can be read") from None
    return cls.from_dict(data)
