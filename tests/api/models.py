"""Models built on PyTorch's own transformer layers (importable: tests.api.models:Class)."""

from __future__ import annotations

import torch
from torch import nn


class TinyViT(nn.Module):
    """A small ViT-like classifier on nn.TransformerEncoder (as users write them)."""

    def __init__(
        self,
        img_size: int = 16,
        patch: int = 4,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp: int = 64,
        num_classes: int = 5,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (img_size // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, mlp, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.encoder(x))[:, 0])


class Seq2Seq(nn.Module):
    """Encoder-decoder on nn.Transformer (decoder layers included)."""

    def __init__(self, dim: int = 32, heads: int = 4, mlp: int = 64) -> None:
        super().__init__()
        self.net = nn.Transformer(dim, heads, 1, 1, mlp, dropout=0.0, batch_first=True)
        self.out = nn.Linear(dim, 7)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(src, tgt))
