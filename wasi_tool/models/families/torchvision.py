"""torchvision's ViT (``encoder.layers.encoder_layer_i``) and Swin (``features.s.j``), as
archs ``torchvision:<name>`` built by models/tv.py (ViT's attention a ``SelfAttention`` with
an ``in_proj`` linear, Swin's a ``WindowAttention`` calling its ``qkv``/``proj`` modules)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from torch import nn

from wasi_tool.models import tv
from wasi_tool.models.families.base import (
    WINDOWED,
    InputSpec,
    ModelFamily,
    TokenDropAnswer,
    is_windowed,
    module_list,
)
from wasi_tool.nn.attention import SelfAttention
from wasi_tool.nn.token_drop import TorchvisionTokenDropBlock


class TorchvisionFamily(ModelFamily):
    """torchvision's ViT and Swin (see the module doc)."""

    name = "torchvision"
    block_layout = "torchvision's ViT `encoder.layers` and Swin `features`"
    presets: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "mlp": (
            *("encoder.layers.encoder_layer_*.mlp.0", "encoder.layers.encoder_layer_*.mlp.3"),
            *("features.*.mlp.0", "features.*.mlp.3"),
        ),
        "attn": (
            "encoder.layers.encoder_layer_*.self_attention.in_proj",
            "encoder.layers.encoder_layer_*.self_attention.out_proj",
            *("features.*.attn.qkv", "features.*.attn.proj"),
        ),
    }
    final_norms = ("encoder.ln", "norm")
    attn_children = ("self_attention", "attn")
    mlp_children = ("mlp",)

    def owns_arch(self, arch: str) -> bool:
        return tv.is_tv_arch(arch)

    def arch_names(self) -> Iterable[str]:
        return tv.ARCHS

    def spelled(self, arch: str) -> str | None:
        return tv.PREFIX + arch if tv.PREFIX + arch in tv.ARCHS else None

    def check_arch(self, arch: str) -> None:
        tv.check_arch(arch)

    def build(self, arch: str, **kwargs: Any) -> nn.Module:
        return tv.build(arch, **kwargs)

    def default_classifier(self, arch: str) -> str | None:
        return tv.default_classifier(arch)

    def image_size_of(self, arch: str, state: Mapping[str, Any]) -> int | None:
        return tv.image_size_of(arch, state)

    def matches(self, model: nn.Module) -> bool:
        return tv.is_tv(model)

    def blocks(self, model: nn.Module) -> list[str]:
        layers = module_list(model, "encoder.layers")
        if layers is not None:  # ViT
            return [f"encoder.layers.{name}" for name, _ in layers.named_children()]
        features = module_list(model, "features")
        if features is None:
            return []
        return [  # Swin: the stages are Sequentials of blocks (patch merging in between)
            f"features.{i}.{j}"
            for i, stage in enumerate(features)
            if isinstance(stage, nn.Sequential) and hasattr(stage[0], "attn")
            for j in range(len(stage))
        ]

    def input_spec(self, model: nn.Module, model_kwargs: Mapping[str, Any]) -> InputSpec:
        """torchvision's ImageNet eval transform of the arch's weights (resize, center crop,
        mean, std), scaled when the model was built for another size."""
        arch = getattr(model, "wasi_arch", None)
        pre = tv.preprocessing(arch) if isinstance(arch, str) else None
        crop = pre["crop"] if pre else 224
        size = model_kwargs.get("img_size") or tv.vit_image_size(model) or crop
        size = int(size)
        if pre is None:
            return InputSpec("images", size)
        resize = round(pre["resize"] * size / crop)
        return InputSpec(
            "images",
            size,
            pre["mean"],
            pre["std"],
            resize=resize,
            interpolation=pre["interpolation"],
        )

    def token_drop_block(self, model: nn.Module, block: nn.Module) -> TokenDropAnswer:
        """ViT's EncoderBlock drops tokens (``TorchvisionTokenDropBlock``) when the model has
        a class token and the block's attention is a ``SelfAttention``; Swin's blocks do not."""
        if is_windowed(block):
            return WINDOWED
        from torchvision.models.vision_transformer import EncoderBlock

        if not isinstance(block, (EncoderBlock, TorchvisionTokenDropBlock)):
            return f"its blocks are {type(block).__name__}, not torchvision's EncoderBlock"
        if getattr(model, "class_token", None) is None:
            return "the model has no CLS token"
        attn: Any = getattr(block, "self_attention", None)
        if not isinstance(attn, SelfAttention):
            return f"its attention is {type(attn).__name__}, not SelfAttention"
        return TorchvisionTokenDropBlock
