"""Loading checkpoints, model families and choosing target layers."""

from wasi_tool.models.loading import LoadedModel, ModelSource, load_artifact, load_model
from wasi_tool.models.registry import build_model
from wasi_tool.models.targets import select_targets

__all__ = [
    "LoadedModel",
    "ModelSource",
    "build_model",
    "load_artifact",
    "load_model",
    "select_targets",
]
