"""Tiny offline fixtures: random-init timm models at small input sizes, saved checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from wasi_tool.models.registry import build_model

# ViT-Tiny at 32 px: 12 blocks of width 192 (4 patches + CLS), fast enough for every test.
TINY = {"arch": "vit_tiny_patch16_224", "img_size": 32, "num_classes": 10}


def _tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(TINY["arch"], num_classes=TINY["num_classes"], img_size=TINY["img_size"])


def _images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=gen)


def _tiny_onnx(path: Path, classes: int = 10, seed: int = 0) -> Path:
    """pixel_values (batch, 3, 8, 8) -> Flatten -> MatMul -> logits: a valid dynamic-batch model."""
    w = np.random.default_rng(seed).standard_normal((192, classes)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["pixel_values"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_spec() -> Mapping[str, Any]:
    """The tiny model's arch, img_size and num_classes (read-only)."""
    return MappingProxyType(TINY)


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., nn.Module]:
    """Factory: ``tiny_model(seed=0)`` builds a fresh random-init tiny ViT."""
    return _tiny_model


@pytest.fixture(scope="session")
def images() -> Callable[..., torch.Tensor]:
    """Factory: ``images(batch=2, size=32, seed=1)`` gives a seeded random image batch."""
    return _images


@pytest.fixture(scope="session")
def tiny_onnx() -> Callable[..., Path]:
    """Factory: ``tiny_onnx(path, classes=10, seed=0)`` writes a tiny ONNX classifier."""
    return _tiny_onnx


@pytest.fixture
def tiny() -> nn.Module:
    return _tiny_model()


@pytest.fixture
def tiny_pth(tmp_path: Path, tiny: nn.Module) -> Path:
    """A plain state dict saved with torch.save, as most training scripts do."""
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    return path
