"""A recipe's parsed stages (shared by the recipe parser, the stage kinds and the runner)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wasi_tool.errors import WasiToolError


@dataclass
class StageSpec:
    name: str
    kind: str
    input: str | None
    source: dict[str, Any]
    config: dict[str, Any]
    options: dict[str, Any]
    line: int = 0

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.config, "options": self.options}


@dataclass
class Pipeline:
    name: str
    description: str
    stages: list[StageSpec]
    path: Path

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise WasiToolError(f"{self.path}: no stage named {name!r}")
