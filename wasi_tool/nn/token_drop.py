"""Token dropping inside timm ViT blocks and torchvision ViT encoder blocks (the BSR
baseline's EViT-style dropping, method.md section 7): after attention and its residual, patch
tokens are ranked by the CLS token's attention averaged over heads; the top
``ceil(keep_rate * (N - 1))`` stay with CLS, and the dropped ones are fused into one token
(their attention-weighted average) or discarded.

``TokenDropBlock`` is part of the model: it applies in training, at inference and in the
exported ONNX graph (TopK + GatherElements); artifacts record it (``token_drop_spec``). Which
blocks can drop tokens, and with which class, is the model family's answer
(``ModelFamily.token_drop_block``; ``wasi_tool.models.families.enable_token_drop_``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.nn.swap import set_submodule


def check_keep_rate(keep_rate: float) -> float:
    """The one check of a keep rate: a share of patch tokens in (0, 1]."""
    if not 0.0 < float(keep_rate) <= 1.0:
        raise WasiToolError(f"keep_rate must be in (0, 1], got {keep_rate}")
    return float(keep_rate)


def attention_with_cls(attn: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm Attention's output for ``x`` and the CLS token's attention over the patch tokens,
    averaged over heads: shape (B, N - 1)."""
    b, n, _ = x.shape
    heads, head_dim = int(attn.num_heads), int(attn.head_dim)
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    drop = float(attn.attn_drop.p) if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
    cls = ((q[:, :, :1] * float(attn.scale)) @ k.transpose(-2, -1)).softmax(dim=-1)
    cls = cls.mean(dim=1)[:, 0, 1:]
    out = out.transpose(1, 2).reshape(b, n, heads * head_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), cls


def kept_tokens(n_patch: int, keep_rate: float) -> int:
    return min(n_patch, math.ceil(keep_rate * n_patch))


def drop_tokens(
    x: torch.Tensor, cls_attn: torch.Tensor, keep_rate: float, fuse: bool
) -> torch.Tensor:
    """Keep CLS and the top ``ceil(keep_rate * (N - 1))`` patch tokens by ``cls_attn``; fuse
    the rest into one token (their attention-weighted average) when ``fuse``."""
    b, n, c = x.shape
    n_patch = n - 1
    keep = kept_tokens(n_patch, keep_rate)
    if keep >= n_patch:
        return x
    weights, order = cls_attn.topk(n_patch, dim=1)  # one sort: kept first, dropped after
    patches = x[:, 1:]
    kept = patches.gather(1, order[:, :keep, None].expand(b, keep, c))
    parts = [x[:, :1], kept]
    if fuse:
        rest = patches.gather(1, order[:, keep:, None].expand(b, n_patch - keep, c))
        w = weights[:, keep:, None]
        parts.append((rest * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1)


class TokenDropBlock(nn.Module):
    """A timm ViT Block that drops tokens after attention + residual, before its MLP.

    It adopts the block's children under their own names, so the state dict is unchanged.
    """

    def __init__(self, block: nn.Module, keep_rate: float, fuse: bool) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.keep_rate, self.fuse = float(keep_rate), bool(fuse)

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, fuse={self.fuse}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b: Any = self  # the adopted timm children
        out, cls = attention_with_cls(b.attn, b.norm1(x))
        x = x + b.drop_path1(b.ls1(out))
        x = drop_tokens(x, cls, self.keep_rate, self.fuse)
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


class TorchvisionTokenDropBlock(TokenDropBlock):
    """A torchvision ViT EncoderBlock (its attention a ``SelfAttention``) that drops tokens
    after attention + residual, before its MLP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b: Any = self  # the adopted torchvision children
        out, cls = b.self_attention.forward_with_cls(b.ln_1(x))
        x = x + b.dropout(out)
        x = drop_tokens(x, cls, self.keep_rate, self.fuse)
        return x + b.mlp(b.ln_2(x))


def enable_token_drop_(
    model: nn.Module,
    spec: Mapping[str, tuple[float, bool]],
    kind: Callable[[nn.Module], type[TokenDropBlock] | str],
) -> None:
    """Make the named blocks drop tokens: ``{block name: (keep_rate, fuse)}``. ``kind(block)``
    is the ``TokenDropBlock`` class that wraps the block, or why it cannot drop tokens (the
    model's family knows: ``wasi_tool.models.families.enable_token_drop_`` asks it)."""
    for name, (keep_rate, fuse) in spec.items():
        try:
            block = model.get_submodule(name)
        except AttributeError:
            raise WasiToolError(f"no block {name!r} to drop tokens in") from None
        found = kind(block)
        if isinstance(found, str):
            raise WasiToolError(f"cannot drop tokens in {name}: {found}")
        check_keep_rate(keep_rate)
        if isinstance(block, TokenDropBlock):
            block.keep_rate, block.fuse = float(keep_rate), bool(fuse)
        else:
            set_submodule(model, name, found(block, keep_rate, fuse))


def token_drop_spec(model: nn.Module) -> dict[str, list[float | bool]]:
    """The model's dropping blocks as ``{name: [keep_rate, fuse]}`` (artifact metadata)."""
    return {
        name: [m.keep_rate, m.fuse]
        for name, m in model.named_modules()
        if isinstance(m, TokenDropBlock)
    }
