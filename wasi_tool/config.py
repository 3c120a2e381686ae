"""What every stage config shares: a plain-dict round trip that rejects unknown keys."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from wasi_tool.errors import WasiToolError

C = TypeVar("C", bound="StageConfig")


class StageConfig:
    """Mixin for ``@dataclass`` stage configs; ``stage`` names the stage in messages."""

    stage: ClassVar[str] = "stage"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Rebuild a config from its fields; unknown keys are an error, never imported."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            raise WasiToolError(f"unknown {cls.stage} setting(s): {', '.join(sorted(unknown))}")
        return cls(**data)
