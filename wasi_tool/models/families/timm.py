"""timm's vision transformers: ViT/DeiT (``blocks.i``), Swin (``layers.i.blocks.j``), built by
``timm.create_model`` offline (never downloads weights)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.models.families.base import (
    ARCH_KWARGS,
    DEFAULT_MEAN,
    MODEL_KWARGS,
    WINDOWED,
    InputSpec,
    ModelFamily,
    TokenDropAnswer,
    is_windowed,
    module_list,
)
from wasi_tool.models.timm_import import import_timm
from wasi_tool.nn.token_drop import TokenDropBlock


def timm_blocks(model: nn.Module) -> list[str]:
    """timm's block lists: ``blocks.i`` (ViT), ``layers.i.blocks.j`` (Swin)."""
    blocks = module_list(model, "blocks")
    if blocks is not None:
        return [f"blocks.{i}" for i in range(len(blocks))]
    layers = module_list(model, "layers")
    if layers is None:
        return []
    return [
        f"layers.{i}.blocks.{j}"
        for i, layer in enumerate(layers)
        for j in range(len(getattr(layer, "blocks", ())))
    ]


def timm_input_spec(model: nn.Module, model_kwargs: Mapping[str, Any]) -> InputSpec:
    """timm's own data config (mean, std), at the size the model was built for."""
    import_timm()
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    size = model_kwargs.get("img_size")
    if size is None:
        img = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img is not None:
            size = img[0] if isinstance(img, (tuple, list)) else img
    if size is None:
        size = cfg["input_size"][-1]
    return InputSpec("images", int(size), tuple(cfg.get("mean", DEFAULT_MEAN)), tuple(cfg["std"]))


def vit_token_drop(model: nn.Module, block: nn.Module) -> TokenDropAnswer:
    """timm's ViT Block drops tokens (``TokenDropBlock``) when the model has one CLS token
    and no other prefix tokens, and its attention is timm's ``Attention``."""
    if is_windowed(block):
        return WINDOWED
    import_timm()
    from timm.models.vision_transformer import Attention, Block

    if getattr(model, "cls_token", None) is None:
        return "the model has no CLS token"
    if getattr(model, "num_prefix_tokens", 1) != 1:
        return "the model has register tokens besides CLS"
    if type(block) is not Block and not isinstance(block, TokenDropBlock):
        return f"its blocks are {type(block).__name__}, not timm's ViT Block"
    attn: Any = getattr(block, "attn", None)
    if type(attn) is not Attention:
        return f"its attention is {type(attn).__name__}, not timm's Attention"
    return TokenDropBlock


class TimmFamily(ModelFamily):
    """timm vision transformers: ViT/DeiT (``blocks.i``), Swin (``layers.i.blocks.j``)."""

    name = "timm"
    block_layout = "`blocks` (timm ViT), `layers.*.blocks` (timm Swin)"
    presets: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "mlp": ("*mlp.fc1", "*mlp.fc1_g", "*mlp.fc1_x", "*mlp.fc2"),
        "attn": ("*attn.qkv", "*attn.q", "*attn.kv", "*attn.k", "*attn.v", "*attn.proj"),
    }
    final_norms = ("norm", "fc_norm", "head.norm")

    def owns_arch(self, arch: str) -> bool:
        timm = import_timm()

        return bool(timm.is_model(arch))

    def arch_names(self) -> Iterable[str]:
        timm = import_timm()

        names: list[str] = timm.list_models()
        return names

    def build(self, arch: str, **kwargs: Any) -> nn.Module:
        """A randomly initialised timm model; ``kwargs`` from MODEL_KWARGS and ARCH_KWARGS."""
        timm = import_timm()

        unknown = set(kwargs) - set(MODEL_KWARGS) - set(ARCH_KWARGS)
        if unknown:
            raise WasiToolError(f"unsupported model arguments: {', '.join(sorted(unknown))}")
        given = {k: v for k, v in kwargs.items() if v is not None}
        try:
            model = timm.create_model(arch, pretrained=False, **given)
        except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
            raise WasiToolError(f"cannot build {arch} with {given}: {exc}") from None
        _check_patch(model, arch)
        return model.eval()

    def default_classifier(self, arch: str) -> str | None:
        """The classifier's module name in timm's pretrained config of ``arch``."""
        timm = import_timm()

        try:
            cfg = timm.models.get_pretrained_cfg(arch)
        except Exception:  # an arch with no pretrained cfg simply has no recorded classifier
            return None
        name = getattr(cfg, "classifier", None) if cfg is not None else None
        if isinstance(name, (tuple, list)):
            name = name[0] if name else None
        return name if isinstance(name, str) else None

    def matches(self, model: nn.Module) -> bool:
        """A model timm built: it carries timm's ``pretrained_cfg``."""
        return isinstance(getattr(model, "pretrained_cfg", None), dict)

    def recorded_arch(self, model: nn.Module) -> str | None:
        """The timm architecture name a model records about itself (its pretrained_cfg)."""
        cfg = getattr(model, "pretrained_cfg", None)
        if isinstance(cfg, dict):
            arch = cfg.get("architecture")
            return arch if isinstance(arch, str) else None
        return None

    def blocks(self, model: nn.Module) -> list[str]:
        return timm_blocks(model)

    def input_spec(self, model: nn.Module, model_kwargs: Mapping[str, Any]) -> InputSpec:
        return timm_input_spec(model, model_kwargs)

    def token_drop_block(self, model: nn.Module, block: nn.Module) -> TokenDropAnswer:
        return vit_token_drop(model, block)


def _check_patch(model: nn.Module, arch: str) -> None:
    """Refuse an input size smaller than the patch (a ViT would fail in its first conv)."""
    embed = getattr(model, "patch_embed", None)
    patch: Any = getattr(embed, "patch_size", None)
    size: Any = getattr(embed, "img_size", None)
    sized = isinstance(patch, (tuple, list)) and isinstance(size, (tuple, list)) and size
    if sized and any(int(s) < int(p) for s, p in zip(size, patch, strict=False)):
        raise WasiToolError(
            f"{arch}: images of {size[0]} px are smaller than its {patch[0]} px patch; "
            f"give --img-size >= {patch[0]}"
        )
