"""LoRA baseline through the ``peft`` library: adapters on the target linears, merged back
into plain dense linears for saving and export.

Trainable: the adapters (A, B) and the classifier head; everything else is frozen (peft's
default plus the head, which a new task needs). At initialisation B = 0, so the model's
output is unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.methods.base import LayerOptions, Method, Note, dense, register_method
from wasi_tool.models.family import CAUSAL_LM, family_of
from wasi_tool.nn.fastpath import sync_fast_paths_
from wasi_tool.nn.swap import set_submodule


def apply_lora_(
    model: nn.Module,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    seed: int = 0,
) -> None:
    """Inject LoRA adapters into exactly the ``targets`` linears of ``model`` (in place)."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise WasiToolError(f"lora rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise WasiToolError(f"lora dropout must be in [0, 1), got {dropout}")
    if not targets:
        raise WasiToolError("lora needs at least one target linear")
    for name in targets:
        if type(model.get_submodule(name)) is not nn.Linear:
            raise WasiToolError(f"lora targets must be dense nn.Linear layers; {name} is not")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int, takes float
        lora_dropout=dropout,
        # a regex string is matched against the whole module name: exactly these layers
        target_modules="|".join(re.escape(n) for n in targets),
        bias="none",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model)
    for name in targets:  # peft swapped them in itself: decline the fused kernels that would
        sync_fast_paths_(model, name)  # read linear.weight and skip the adapters in eval
    if family_of(model).task(model) == CAUSAL_LM:  # the vocabulary head is pretrained: frozen
        return
    for name in family_of(model).heads(model):  # a new task head trains with the adapters
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


def lora_layers(model: nn.Module) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def merge_lora_(model: nn.Module) -> int:
    """Fold every adapter into its base linear (W + scale * B A) and put the plain linear
    back in its place; returns the number of merged layers."""
    names = lora_layers(model)
    for name in names:
        layer = model.get_submodule(name)
        layer.merge()  # type: ignore[operator]
        base = layer.get_base_layer()  # type: ignore[operator]
        set_submodule(model, name, base)
    return len(names)


class LoRA(Method):
    """Frozen model, peft LoRA adapters on the targets, trainable head; merged on save."""

    name = "lora"
    description = "frozen model, peft LoRA adapters on the targets + head"
    adapter = True

    def build_layer(self, layer: nn.Module, options: LayerOptions) -> nn.Module:
        return dense(layer)

    def after_swap(
        self, model: nn.Module, targets: list[str], settings: Any, plan: Any, note: Note
    ) -> None:
        apply_lora_(
            model,
            targets,
            settings.lora_rank,
            settings.lora_alpha,
            settings.lora_dropout,
            settings.seed,
        )

    def finalize_(self, model: nn.Module) -> None:
        merge_lora_(model)


register_method(LoRA)
