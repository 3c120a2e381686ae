"""BSR: block-selective reprogramming with attention-based token dropping (method.md section 7).

Only a few blocks, the final norm and the classifier train; every other parameter is frozen.
Nothing before the first trained block requires grad, so autograd records nothing there (the
blocks run as if under ``no_grad``; tested by counting saved tensors). In the chosen
drop blocks, after attention and its residual, patch tokens are ranked by the CLS token's
attention averaged over heads; the top ``ceil(keep_rate * (N - 1))`` stay with CLS, and the
dropped ones are fused into one token, their average weighted by that attention (EViT), or
discarded (``fuse=False``). Dropping is part of the model: it applies in training, at
inference and in the exported ONNX graph (TopK + GatherElements).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.models.registry import classifier_names

FINAL_NORMS = ("norm", "fc_norm", "head.norm", "model.norm", "bert.pooler")
HF_BLOCKS = ("bert.encoder.layer", "model.layers", "distilbert.transformer.layer")
PAPER_DEPTH = 12
PAPER_BLOCKS = (3, 7, 11)
PAPER_DROP_AT = (3, 6, 9)


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the model's transformer blocks in execution order.

    ViT-style models keep them in ``blocks``; Swin-style ones in ``layers.i.blocks``.
    """
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        return [f"blocks.{i}" for i in range(len(blocks))]
    for path in HF_BLOCKS:  # Hugging Face text models: block selection only (no CLS dropping)
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found):
            return [f"{path}.{i}" for i in range(len(found))]
    layers = getattr(model, "layers", None)
    if isinstance(layers, (nn.Sequential, nn.ModuleList)):
        names = [
            f"layers.{i}.blocks.{j}"
            for i, layer in enumerate(layers)
            for j in range(len(getattr(layer, "blocks", ())))
        ]
        if names:
            return names
    raise WasiToolError(
        f"bsr needs a model with transformer blocks in `blocks` (ViT), `layers.*.blocks` "
        f"(Swin) or a Hugging Face layer list; {type(model).__name__} has none of them"
    )


def default_indices(depth: int, paper: Sequence[int]) -> list[int]:
    """The paper's 12-block choice scaled to ``depth`` blocks (3,7,11 -> 1,3,5 for 6)."""
    return sorted({min(depth - 1, b * depth // PAPER_DEPTH) for b in paper})


def _check_indices(what: str, indices: Sequence[int], depth: int) -> list[int]:
    bad = [i for i in indices if not 0 <= int(i) < depth]
    if bad:
        raise WasiToolError(f"{what} {bad} out of range: the model has blocks 0..{depth - 1}")
    return sorted({int(i) for i in indices})


def supports_token_drop(model: nn.Module, block: nn.Module) -> str | None:
    """Why this model's blocks cannot drop tokens, or None when they can."""
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


@dataclass
class BSRPlan:
    """Which blocks train and which drop tokens, resolved for one model."""

    blocks: list[str]
    trained: list[int]
    drop_at: list[int]
    keep_rate: float
    fuse: bool
    notes: list[str] = field(default_factory=list)

    @property
    def trained_names(self) -> list[str]:
        return [self.blocks[i] for i in self.trained]

    def to_dict(self) -> dict[str, object]:
        return {
            "trained_blocks": self.trained,
            "drop_at": self.drop_at,
            "keep_rate": self.keep_rate,
            "fuse": self.fuse,
            "block_names": self.trained_names,
            "notes": self.notes,
        }


def plan_bsr(
    model: nn.Module,
    trained: Sequence[int] | None = None,
    drop_at: Sequence[int] | None = None,
    keep_rate: float = 0.5,
    fuse: bool = True,
) -> BSRPlan:
    """Resolve the trained and dropping blocks (defaults scaled from the paper's 12 blocks)."""
    if not 0.0 < keep_rate <= 1.0:
        raise WasiToolError(f"keep_rate must be in (0, 1], got {keep_rate}")
    blocks = find_blocks(model)
    depth = len(blocks)
    chosen = (
        _check_indices("bsr blocks", trained, depth)
        if trained is not None
        else default_indices(depth, PAPER_BLOCKS)
    )
    if not chosen:
        raise WasiToolError("bsr needs at least one trained block")
    drops = (
        _check_indices("drop-at blocks", drop_at, depth)
        if drop_at is not None
        else default_indices(depth, PAPER_DROP_AT)
    )
    notes = []
    why = supports_token_drop(model, model.get_submodule(blocks[0]))
    if drops and why is not None:
        notes.append(f"block selection only, no token dropping: {why}")
        drops = []
    if keep_rate == 1.0:
        drops = []
    return BSRPlan(blocks, chosen, drops, float(keep_rate), bool(fuse), notes)


def trainable_names(model: nn.Module, plan: BSRPlan) -> list[str]:
    """Modules whose parameters train: the chosen blocks, the final norm(s), the classifier."""
    names = list(plan.trained_names)
    names += [n for n in FINAL_NORMS if _has_module(model, n)]
    names += sorted(classifier_names(model))
    return names


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return False
    return any(True for _ in module.parameters())


def freeze_outside_(model: nn.Module, keep: Sequence[str]) -> int:
    """Turn off requires_grad for every parameter outside the ``keep`` modules.

    Parameters inside them are left as they are (a WASI layer's factors never take autograd
    gradients). Returns the number of parameters left trainable.
    """
    inside = {id(p) for name in keep for p in model.get_submodule(name).parameters()}
    for p in model.parameters():
        if id(p) not in inside:
            p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def apply_bsr_(model: nn.Module, plan: BSRPlan) -> list[str]:
    """Freeze all but the trained modules and install token dropping; returns those modules."""
    keep = trainable_names(model, plan)
    freeze_outside_(model, keep)
    enable_token_drop_(model, {plan.blocks[i]: (plan.keep_rate, plan.fuse) for i in plan.drop_at})
    return keep


# -- token dropping -------------------------------------------------------------------------------


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


def enable_token_drop_(model: nn.Module, spec: Mapping[str, tuple[float, bool]]) -> None:
    """Make the named blocks drop tokens: ``{block name: (keep_rate, fuse)}``."""
    from wasi_tool.nn.swap import set_submodule

    for name, (keep_rate, fuse) in spec.items():
        try:
            block = model.get_submodule(name)
        except AttributeError:
            raise WasiToolError(f"no block {name!r} to drop tokens in") from None
        why = supports_token_drop(model, block)
        if why is not None:
            raise WasiToolError(f"cannot drop tokens in {name}: {why}")
        if not 0.0 < keep_rate <= 1.0:
            raise WasiToolError(f"keep_rate must be in (0, 1], got {keep_rate}")
        if isinstance(block, TokenDropBlock):
            block.keep_rate, block.fuse = float(keep_rate), bool(fuse)
        else:
            set_submodule(model, name, TokenDropBlock(block, keep_rate, fuse))


def token_drop_spec(model: nn.Module) -> dict[str, list[float | bool]]:
    """The model's dropping blocks as ``{name: [keep_rate, fuse]}`` (artifact metadata)."""
    return {
        name: [m.keep_rate, m.fuse]
        for name, m in model.named_modules()
        if isinstance(m, TokenDropBlock)
    }


@torch.no_grad()
def tokens_per_block(model: nn.Module, x: torch.Tensor) -> list[int]:
    """How many tokens each block receives for input ``x`` (one forward pass); a (B, H, W, C)
    input of a Swin block counts H * W."""
    counts: list[int] = []

    def count(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        first = next(
            (a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.ndim >= 3),
            None,
        )
        if first is not None:
            counts.append(math.prod(first.shape[1:-1]))

    handles = [
        model.get_submodule(name).register_forward_pre_hook(count, with_kwargs=True)
        for name in find_blocks(model)
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return counts
