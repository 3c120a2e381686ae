"""Choosing which linear layers a stage acts on."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.models.registry import classifier_names
from wasi_tool.nn.factored import FactoredLinear

# Presets over timm's module names (ViT, DeiT, Swin, and most timm transformers).
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "mlp": ("*mlp.fc1", "*mlp.fc1_g", "*mlp.fc1_x", "*mlp.fc2"),
    "attn": ("*attn.qkv", "*attn.q", "*attn.kv", "*attn.k", "*attn.v", "*attn.proj"),
    "all": ("*",),
}

LINEAR_TYPES = (nn.Linear, FactoredLinear)


def split_patterns(spec: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]`` (blank items dropped)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    return [p.strip() for item in items for p in item.split(",") if p.strip()]


def select_targets(model: nn.Module, targets: str, exclude: Sequence[str] = ()) -> list[str]:
    """Names of the linear layers matched by ``targets`` and not by ``exclude``, in model order.

    ``targets`` is a preset (mlp, attn, all), or comma-separated globs over module names. The
    classifier head is left out unless a pattern names it exactly.
    """
    patterns: list[str] = []
    for item in split_patterns(targets):
        patterns.extend(TARGET_PRESETS.get(item, (item,)))
    if not patterns:
        raise WasiToolError("targets is empty")
    excludes = split_patterns(exclude)
    heads = classifier_names(model)
    linears = [name for name, mod in model.named_modules() if isinstance(mod, LINEAR_TYPES)]
    chosen = []
    for name in linears:
        is_head = name in heads or any(name.startswith(h + ".") for h in heads)
        matched = (
            name in patterns if is_head else any(fnmatch.fnmatchcase(name, p) for p in patterns)
        )
        if matched and not any(fnmatch.fnmatchcase(name, p) for p in excludes):
            chosen.append(name)
    if not chosen:
        sample = ", ".join(linears[:4]) or "none"
        raise WasiToolError(
            f"no linear layer matches targets {targets!r}"
            + (f" minus exclude {','.join(excludes)!r}" if excludes else "")
            + f"; linear layers here look like: {sample}"
        )
    return chosen
