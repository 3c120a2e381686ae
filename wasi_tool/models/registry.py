"""Building architectures by name, offline (never downloads weights): each name is owned by
one model family (models/families/): timm names, ``torchvision:<name>`` for torchvision's ViT
and Swin, ``hf`` and ``custom`` (rebuilt from recorded kwargs only)."""

from __future__ import annotations

from typing import Any

from torch import nn

from wasi_tool.models.families import arch_family, family_of
from wasi_tool.models.families.base import ARCH_KWARGS, MODEL_KWARGS, classifier_names

__all__ = [
    "ARCH_KWARGS",
    "MODEL_KWARGS",
    "arch_of",
    "build_model",
    "check_arch",
    "classifier_names",
    "default_classifier",
]


def check_arch(arch: str) -> None:
    """Raise WasiToolError naming close matches when no family can build ``arch``."""
    arch_family(arch).check_arch(arch)


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """A randomly initialised model of ``arch`` (its family builds it); ``kwargs`` from
    MODEL_KWARGS and ARCH_KWARGS, None values dropped."""
    family = arch_family(arch)
    family.check_arch(arch)
    return family.build(arch, **kwargs)


def default_classifier(arch: str) -> str | None:
    """The classifier's module name of ``arch`` (e.g. timm's ``head``), if its family knows."""
    return arch_family(arch).default_classifier(arch)


def arch_of(model: nn.Module) -> str | None:
    """The architecture name a model records about itself, if any."""
    return family_of(model).recorded_arch(model)
