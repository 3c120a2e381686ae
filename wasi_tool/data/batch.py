"""The batch transform a model needs, from its family's input spec."""

from __future__ import annotations

from typing import Any

from wasi_tool.data.datasets import BatchTransform
from wasi_tool.data.text import TokenBatch
from wasi_tool.models.families import family_of


def batch_transform(loaded: Any) -> BatchTransform:
    """Images: to [0, 1], resized to the model's input size, normalised by timm's data config;
    token ids of a text model pass through unchanged."""
    spec = family_of(loaded.model).input_spec(loaded.model, loaded.model_kwargs)
    if spec.kind == "tokens":
        return TokenBatch(spec.size)
    return BatchTransform(spec.size, spec.mean, spec.std, spec.resize, spec.interpolation)
