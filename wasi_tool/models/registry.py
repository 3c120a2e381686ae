"""Building architectures by name, offline (never downloads weights): timm names, and
``torchvision:<name>`` for torchvision's ViT and Swin (models/tv.py)."""

from __future__ import annotations

from typing import Any

from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.models import tv
from wasi_tool.models.suggest import suggest

# Model constructor arguments wasi-tool records and passes back to timm.create_model.
MODEL_KWARGS = ("num_classes", "img_size")
# Architecture arguments a recipe may set to build a variant of an arch (e.g. a small ViT at
# 32 px with 4-px patches); they are recorded in every artifact so it can be rebuilt.
ARCH_KWARGS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def check_arch(arch: str) -> None:
    """Raise WasiToolError naming close matches when timm has no architecture ``arch``."""
    if tv.is_tv_arch(arch):
        tv.check_arch(arch)
        return
    import timm

    if timm.is_model(arch):
        return
    if tv.PREFIX + arch in tv.ARCHS:
        raise WasiToolError(f"unknown timm architecture {arch!r}; did you mean {tv.PREFIX}{arch}?")
    close = suggest(arch, timm.list_models())
    hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
    raise WasiToolError(f"unknown architecture {arch!r}{hint}")


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """A randomly initialised timm model; ``kwargs`` from MODEL_KWARGS, None values dropped."""
    if tv.is_tv_arch(arch):
        return tv.build(arch, **kwargs)
    import timm

    check_arch(arch)
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


def default_classifier(arch: str) -> str | None:
    """The classifier's module name in timm's pretrained config of ``arch`` (e.g. ``head``)."""
    if tv.is_tv_arch(arch):
        return tv.default_classifier(arch)
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except Exception:  # an arch with no pretrained cfg simply has no recorded classifier
        return None
    name = getattr(cfg, "classifier", None) if cfg is not None else None
    if isinstance(name, (tuple, list)):
        name = name[0] if name else None
    return name if isinstance(name, str) else None


def arch_of(model: nn.Module) -> str | None:
    """The timm architecture name a model records about itself, if any."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        arch = cfg.get("architecture")
        return arch if isinstance(arch, str) else None
    return None


def classifier_names(model: nn.Module) -> set[str]:
    """Module names of the model's classifier head(s) (timm's get_classifier)."""
    getter = getattr(model, "get_classifier", None)
    if getter is None:
        return set()
    heads = getter()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    ids = {id(h) for h in heads if isinstance(h, nn.Module)}
    return {name for name, mod in model.named_modules() if id(mod) in ids and name}
