"""Token dropping inside timm ViT blocks and torchvision ViT encoder blocks (the BSR
baseline's EViT-style dropping, method.md section 7): after attention and its residual, patch
tokens are ranked by the CLS token's attention averaged over heads; the top
``ceil(keep_rate * (N - 1))`` stay with CLS, and the dropped ones are fused into one token
(their attention-weighted average) or discarded.

``TokenDropBlock`` is part of the model: it applies in training, at inference and in the
exported ONNX graph (TopK + GatherElements); artifacts record it (``token_drop_spec``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.nn.attention import SelfAttention
from wasi_tool.nn.swap import set_submodule


def check_keep_rate(keep_rate: float) -> float:
    """The one check of a keep rate: a share of patch tokens in (0, 1]."""
    if not 0.0 < float(keep_rate) <= 1.0:
        raise WasiToolError(f"keep_rate must be in (0, 1], got {keep_rate}")
    return float(keep_rate)


def supports_token_drop(model: nn.Module, block: nn.Module) -> str | None:
    """Why this model's blocks cannot drop tokens, or None when they can."""
    if _is_windowed(block):
        return (
            "windowed attention (Swin) has no CLS token and needs the full token grid; "
            "Swin supports block selection only"
        )
    if _is_tv_encoder_block(block):
        if getattr(model, "class_token", None) is None:
            return "the model has no CLS token"
        if not isinstance(block.self_attention, SelfAttention):
            return f"its attention is {type(block.self_attention).__name__}, not SelfAttention"
        return None
    from timm.models.vision_transformer import Attention, Block

    if getattr(model, "cls_token", None) is None:
        return "the model has no CLS token"
    if getattr(model, "num_prefix_tokens", 1) != 1:
        return "the model has register tokens besides CLS"
    if type(block) is not Block and not isinstance(block, TokenDropBlock):
        return f"its blocks are {type(block).__name__}, not timm's ViT Block"
    if type(block.attn) is not Attention:
        return f"its attention is {type(block.attn).__name__}, not timm's Attention"
    return None


def _is_windowed(block: nn.Module) -> bool:
    attn = getattr(block, "attn", None)
    return hasattr(attn, "window_size") and hasattr(attn, "relative_position_bias_table")


def _is_tv_encoder_block(block: nn.Module) -> bool:
    """torchvision's ViT EncoderBlock (or one already dropping tokens)."""
    if isinstance(block, TorchvisionTokenDropBlock):
        return True
    return all(hasattr(block, c) for c in ("ln_1", "self_attention", "dropout", "ln_2", "mlp"))


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


def enable_token_drop_(model: nn.Module, spec: Mapping[str, tuple[float, bool]]) -> None:
    """Make the named blocks drop tokens: ``{block name: (keep_rate, fuse)}``."""
    for name, (keep_rate, fuse) in spec.items():
        try:
            block = model.get_submodule(name)
        except AttributeError:
            raise WasiToolError(f"no block {name!r} to drop tokens in") from None
        why = supports_token_drop(model, block)
        if why is not None:
            raise WasiToolError(f"cannot drop tokens in {name}: {why}")
        check_keep_rate(keep_rate)
        if isinstance(block, TokenDropBlock):
            block.keep_rate, block.fuse = float(keep_rate), bool(fuse)
        else:
            cls = TorchvisionTokenDropBlock if _is_tv_encoder_block(block) else TokenDropBlock
            set_submodule(model, name, cls(block, keep_rate, fuse))


def token_drop_spec(model: nn.Module) -> dict[str, list[float | bool]]:
    """The model's dropping blocks as ``{name: [keep_rate, fuse]}`` (artifact metadata)."""
    return {
        name: [m.keep_rate, m.fuse]
        for name, m in model.named_modules()
        if isinstance(m, TokenDropBlock)
    }
