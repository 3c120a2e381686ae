"""Tiny offline fixtures: random-init timm models at small input sizes, saved checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from wasi_tool.models.registry import build_model

# ViT-Tiny at 32 px: 12 blocks of width 192 (4 patches + CLS), fast enough for every test.
TINY = {"arch": "vit_tiny_patch16_224", "img_size": 32, "num_classes": 10}


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(TINY["arch"], num_classes=TINY["num_classes"], img_size=TINY["img_size"])


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=gen)


@pytest.fixture
def tiny() -> nn.Module:
    return tiny_model()


@pytest.fixture
def tiny_pth(tmp_path: Path, tiny: nn.Module) -> Path:
    """A plain state dict saved with torch.save, as most training scripts do."""
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    return path
