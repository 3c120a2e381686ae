"""Pipelines: stages chained from a declarative TOML recipe, each reused when nothing changed.

recipe (parse and validate), kinds (the StageKind registry), runner (run and reuse by key),
report (the comparison of a run's stages).
"""

from wasi_tool.pipeline.kinds import KINDS, StageKind, register_kind
from wasi_tool.pipeline.recipe import load_pipeline, parse_value
from wasi_tool.pipeline.runner import PIPELINE_FILE, StageRecord, run_pipeline
from wasi_tool.pipeline.spec import Pipeline, StageSpec

__all__ = [
    "KINDS",
    "PIPELINE_FILE",
    "Pipeline",
    "StageKind",
    "StageRecord",
    "StageSpec",
    "load_pipeline",
    "parse_value",
    "register_kind",
    "run_pipeline",
]
