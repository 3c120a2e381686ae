"""torchvision's vision transformers as archs ``torchvision:<name>``, built offline.

ViT (``vit_b_16``, ``vit_b_32``, ``vit_l_16``) and Swin (``swin_t``, ``swin_s``, ``swin_b``),
the models of the WASI paper's reference code. They are torchvision's own classes, built with
``weights=None`` (nothing is downloaded) and loaded from a torchvision state dict; module and
state-dict names stay torchvision's (``encoder.layers.encoder_layer_0.mlp.0``,
``features.1.0.attn.qkv``), so a ``--merge`` export loads back into torchvision.

Two modules are swapped for equal ones whose linears are modules (tested to give the same
logits):

- ViT's ``nn.MultiheadAttention`` becomes ``wasi_tool.nn.attention.SelfAttention``: its packed
  q/k/v projection ``in_proj_weight`` becomes the linear ``self_attention.in_proj`` (3C x C),
  which the ``attn`` preset targets like timm's ``qkv``. The state dict keeps the
  ``in_proj_weight``/``in_proj_bias`` names while ``in_proj`` is dense.
- Swin's ``ShiftedWindowAttention`` calls ``F.linear`` on ``qkv.weight`` and ``proj.weight``;
  ``WindowAttention`` calls the ``qkv`` and ``proj`` modules instead, so they can be factored.

The model class gets a mixin in front (``get_classifier``, ``reset_classifier``), as timm's
models have, so heads are found and replaced the same way.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.models.suggest import suggest
from wasi_tool.nn.attention import replace_mha_

PREFIX = "torchvision:"
# name -> torchvision's constructor arguments (as its builders pass them)
VIT: dict[str, dict[str, int]] = {
    "vit_b_16": {"patch_size": 16, "num_layers": 12, "num_heads": 12, "hidden_dim": 768},
    "vit_b_32": {"patch_size": 32, "num_layers": 12, "num_heads": 12, "hidden_dim": 768},
    "vit_l_16": {"patch_size": 16, "num_layers": 24, "num_heads": 16, "hidden_dim": 1024},
}


class SwinSpec(TypedDict):
    """torchvision's Swin constructor arguments of one size (``sd``: stochastic depth)."""

    embed_dim: int
    depths: list[int]
    num_heads: list[int]
    sd: float


class Preprocessing(TypedDict):
    """The ImageNet eval transform of an arch's torchvision weights."""

    weights: str
    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str


SWIN: dict[str, SwinSpec] = {
    "swin_t": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "sd": 0.2},
    "swin_s": {"embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24], "sd": 0.3},
    "swin_b": {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32], "sd": 0.5},
}
ARCHS = tuple(PREFIX + n for n in (*VIT, *SWIN))
HEADS = {"vit": "heads.head", "swin": "head"}
# wasi-tool's architecture arguments (registry.ARCH_KWARGS) that each kind takes
VIT_KWARGS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
SWIN_KWARGS = ("embed_dim", "num_heads")


def is_tv_arch(arch: str | None) -> bool:
    return isinstance(arch, str) and arch.startswith(PREFIX)


def is_tv(model: nn.Module) -> bool:
    return isinstance(model, _TorchvisionMixin)


def _name(arch: str) -> str:
    return arch[len(PREFIX) :]


def check_arch(arch: str) -> None:
    if arch in ARCHS:
        return
    close = suggest(arch, ARCHS)
    hint = f"; did you mean {', '.join(close)}?" if close else f" (known: {', '.join(ARCHS)})"
    raise WasiToolError(f"unknown torchvision architecture {arch!r}{hint}")


def default_classifier(arch: str) -> str:
    return HEADS["vit" if _name(arch) in VIT else "swin"]


def build(arch: str, **kwargs: Any) -> nn.Module:
    """A randomly initialised torchvision model (torchvision's own init), in eval mode.

    ``num_classes``; ``img_size`` (ViT: the size its position embedding is built for; Swin
    takes any size, so it is only recorded); ViT: ``patch_size``, ``embed_dim``, ``depth``,
    ``num_heads``, ``mlp_ratio``; Swin: ``embed_dim`` and ``num_heads`` (of the first stage,
    doubled at each later stage).
    """
    check_arch(arch)
    name = _name(arch)
    given = {k: v for k, v in kwargs.items() if v is not None}
    allowed = ("num_classes", "img_size", *(VIT_KWARGS if name in VIT else SWIN_KWARGS))
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise WasiToolError(f"{arch} does not take {', '.join(unknown)}")
    try:
        model = _build_vit(name, **given) if name in VIT else _build_swin(name, **given)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise WasiToolError(f"cannot build {arch} with {given}: {exc}") from None
    cls: Any = type(model)
    model.__class__ = _with_mixin(cls)
    model.wasi_arch = arch  # type: ignore[assignment]  # its preprocessing is the arch's
    return model.eval()


def _build_vit(
    name: str,
    *,
    num_classes: int = 1000,
    img_size: int = 224,
    patch_size: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float = 4.0,
) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    args = dict(VIT[name])
    width = int(args["hidden_dim"] if embed_dim is None else embed_dim)
    args.update(
        patch_size=int(args["patch_size"] if patch_size is None else patch_size),
        num_layers=int(args["num_layers"] if depth is None else depth),
        num_heads=int(args["num_heads"] if num_heads is None else num_heads),
        hidden_dim=width,
        mlp_dim=int(width * float(mlp_ratio)),
    )
    model = VisionTransformer(image_size=int(img_size), num_classes=num_classes, **args)
    replace_mha_(model)
    return model


def _build_swin(
    name: str,
    *,
    num_classes: int = 1000,
    img_size: int | None = None,  # Swin takes any size: only recorded
    embed_dim: int | None = None,
    num_heads: int | None = None,
) -> nn.Module:
    from torchvision.models.swin_transformer import (
        ShiftedWindowAttention,
        SwinTransformer,
        SwinTransformerBlock,
    )

    spec = SWIN[name]
    heads = spec["num_heads"]
    if num_heads is not None:
        heads = [int(num_heads) * 2**i for i in range(len(heads))]
    model = SwinTransformer(
        patch_size=[4, 4],
        embed_dim=int(spec["embed_dim"] if embed_dim is None else embed_dim),
        depths=spec["depths"],
        num_heads=heads,
        window_size=[7, 7],
        stochastic_depth_prob=spec["sd"],
        num_classes=num_classes,
        block=SwinTransformerBlock,
    )
    for mod in model.modules():
        if type(mod) is ShiftedWindowAttention:
            mod.__class__ = _window_class()  # same state, qkv/proj called as modules
        elif type(mod) is SwinTransformerBlock:
            mod.__class__ = _block_class()  # same state, the MLP sees (B, H*W, C) tokens
    return model


class _TorchvisionMixin(nn.Module):
    """Put in front of a torchvision model class: timm's head API."""

    num_classes: int
    wasi_arch: str

    def head_name(self) -> str:
        return "heads.head" if hasattr(self, "heads") else "head"

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.head_name())

    def reset_classifier(self, num_classes: int) -> None:
        """A new head of ``num_classes`` classes, initialised as torchvision does (ViT: zeros;
        Swin: truncated normal, std 0.02, zero bias)."""
        head = self.get_classifier()
        in_features = getattr(head, "in_features", None)
        if not isinstance(in_features, int):
            raise WasiToolError(f"cannot replace the head {type(head).__name__}")
        new = nn.Linear(in_features, num_classes)
        if hasattr(self, "heads"):
            nn.init.zeros_(new.weight)
        else:
            nn.init.trunc_normal_(new.weight, std=0.02)
        nn.init.zeros_(new.bias)
        parent, _, child = self.head_name().rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, child, new)
        self.num_classes = num_classes


@cache
def _with_mixin(cls: Any) -> type:
    return type(f"Wasi{cls.__name__}", (_TorchvisionMixin, cls), {"__module__": __name__})


def preprocessing(arch: str) -> Preprocessing:
    """The ImageNet eval preprocessing of the arch's torchvision weights (IMAGENET1K_V1), read
    from the weights enum's ``transforms`` without downloading: resize (shorter side), center
    crop, mean, std, interpolation."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(_name(arch)).IMAGENET1K_V1
    t = weights.transforms()
    return {
        "weights": str(weights),
        "resize": int(t.resize_size[0]),
        "crop": int(t.crop_size[0]),
        "mean": tuple(float(m) for m in t.mean),
        "std": tuple(float(s) for s in t.std),
        "interpolation": str(t.interpolation.value),
    }


def image_size_of(arch: str, state: Any) -> int | None:
    """The image size a torchvision ViT state dict was trained at (its position embedding
    holds (size / patch)^2 + 1 tokens), when it is not 224; None for Swin or 224."""
    pos, conv = state.get("encoder.pos_embedding"), state.get("conv_proj.weight")
    if _name(arch) not in VIT or not isinstance(pos, torch.Tensor) or conv is None:
        return None
    grid = math.isqrt(int(pos.shape[1]) - 1)
    size = grid * int(conv.shape[-1])
    return size if grid * grid == int(pos.shape[1]) - 1 and size != 224 else None


def vit_image_size(model: nn.Module) -> int | None:
    size = getattr(model, "image_size", None)
    return int(size) if isinstance(size, int) else None


def window_attention_forward(module: Any, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` (v1) with ``module.qkv``/``module.proj``
    called as modules instead of ``F.linear`` on their weights; otherwise line for line."""
    from torchvision.models.swin_transformer import _get_relative_position_bias

    window_size, num_heads = list(module.window_size), int(module.num_heads)
    relative_position_bias = _get_relative_position_bias(
        module.relative_position_bias_table, module.relative_position_index, window_size
    )
    b, h, w, c = x.shape
    pad_r = (window_size[1] - w % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - h % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, _ = x.shape
    shift = list(module.shift_size)
    if window_size[0] >= pad_h:
        shift[0] = 0
    if window_size[1] >= pad_w:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    num_windows = (pad_h // window_size[0]) * (pad_w // window_size[1])
    x = x.view(
        b, pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1], c
    )
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * num_windows, window_size[0] * window_size[1], c)
    qkv = module.qkv(x)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (c // num_heads) ** -0.5
    attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        attn_mask = x.new_zeros((pad_h, pad_w))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], None))
        count = 0
        for hs in h_slices:
            for ws in w_slices:
                attn_mask[hs[0] : hs[1], ws[0] : ws[1]] = count
                count += 1
        attn_mask = attn_mask.view(
            pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1]
        )
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(
            num_windows, window_size[0] * window_size[1]
        )
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=module.attention_dropout, training=module.training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), c)
    x = module.proj(x)
    x = F.dropout(x, p=module.dropout, training=module.training)
    x = x.view(
        b, pad_h // window_size[0], pad_w // window_size[1], window_size[0], window_size[1], c
    )
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, c)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


def _window_attention_class() -> type:
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    class _WindowAttention(ShiftedWindowAttention):
        """torchvision's ShiftedWindowAttention calling its qkv/proj as modules."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return window_attention_forward(self, x)

    _WindowAttention.__name__ = _WindowAttention.__qualname__ = "WindowAttention"
    _WindowAttention.__module__ = __name__
    return _WindowAttention


def _swin_block_class() -> type:
    from torchvision.models.swin_transformer import SwinTransformerBlock

    class _SwinBlock(SwinTransformerBlock):
        """torchvision's SwinTransformerBlock with its MLP applied to (B, H*W, C) tokens, as
        timm's Swin does (the same values: the MLP acts on the last axis), so that activations
        of every targeted linear are (batch, tokens, channels)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.stochastic_depth(self.attn(self.norm1(x)))
            b, h, w, c = x.shape
            y = self.mlp(self.norm2(x).reshape(b, h * w, c)).reshape(b, h, w, c)
            return x + self.stochastic_depth(y)

    _SwinBlock.__name__ = _SwinBlock.__qualname__ = "SwinBlock"
    _SwinBlock.__module__ = __name__
    return _SwinBlock


def __getattr__(name: str) -> Any:  # the classes are made on first use (lazy torchvision)
    if name == "WindowAttention":
        return _window_class()
    if name == "SwinBlock":
        return _block_class()
    raise AttributeError(name)


@cache
def _block_class() -> type:
    return _swin_block_class()


@cache
def _window_class() -> type:
    return _window_attention_class()
