"""Loading checkpoints and choosing target layers."""

from wasi_tool.models.loading import LoadedModel, ModelSource, load_artifact, load_model
from wasi_tool.models.registry import build_model
from wasi_tool.models.targets import TARGET_PRESETS, select_targets

__all__ = [
    "TARGET_PRESETS",
    "LoadedModel",
    "ModelSource",
    "build_model",
    "load_artifact",
    "load_model",
    "select_targets",
]
