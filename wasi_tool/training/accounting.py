"""Analytic accounting of a training model: per target layer (memory, FLOPs) and per model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NotRequired, TypedDict

from torch import nn

from wasi_tool.methods import Method
from wasi_tool.ops import accounting

MB = 1024 * 1024
LAYERS_NOTE = (
    "per target layer and step; memory in elements (and MiB at fp32), as method.md section 5; "
    "flops_per_step counts 2 per multiply-add and includes the subspace iterations and core; "
    "flops_per_step_reference_code reproduces the WASI reference code's count (multiply-adds "
    "for the low-rank dW, N/I ranks swapped, no core) for comparison only"
)


class _Flags(TypedDict):
    factored: bool
    compressed: bool
    rank: int | None
    act_ranks: tuple[int, ...] | None


class LayerAccounting(TypedDict):
    """One target layer's analytic figures (a row of metrics.json's ``analytic.layers``)."""

    name: str
    act_shape: list[int]
    out_features: int
    in_features: int
    rank: int | None  # the weight's rank K (wsi/wasi) or the adapter rank (lora)
    act_ranks: list[int] | None
    memory_elements: dict[str, int]
    memory_mib_fp32: dict[str, float]
    flops_per_step: dict[str, int]
    flops_per_step_reference_code: NotRequired[dict[str, int]]


class ModelAccounting(TypedDict):
    """Whole-model figures (metrics.json's ``analytic.model``, before the method's own)."""

    parameters: int
    trainable_parameters: int
    gradient_elements: int
    note: str


def layer_accounting(
    model: nn.Module,
    targets: list[str],
    method: Method,
    act_shapes: Mapping[str, tuple[int, ...]],
    adapter_rank: int | None = None,
) -> list[LayerAccounting]:
    """Analytic memory and FLOPs per target layer, ours and the reference code's count."""
    rows = []
    adapter = adapter_rank if method.adapter else None
    for name in targets:
        layer: Any = model.get_submodule(name)
        saves = getattr(method, "adapter_saves", "both")
        if type(layer).__name__ == "RecomputeLoraLinear":  # lora_recompute: x only
            saves = "input"
        if hasattr(layer, "get_base_layer"):  # a peft LoRA layer
            layer = layer.get_base_layer()
        shape = act_shapes.get(name)
        if shape is None:
            continue
        o, i = int(layer.out_features), int(layer.in_features)
        rank = int(layer.rank) if method.factored_weight else adapter
        act = getattr(layer, "act", None)
        ranks = tuple(min(r, d) for r, d in zip(act.ranks, shape, strict=True)) if act else None
        if ranks and getattr(act, "whole_batch", False):  # asi-fixed: the batch mode is whole
            ranks = (shape[0], *ranks[1:])
        flags: _Flags = {
            "factored": method.factored_weight,
            "compressed": method.compressed_activations,
            "rank": int(layer.rank) if method.factored_weight else None,
            "act_ranks": ranks,
        }
        forward_only = bool(getattr(method, "forward_only", False))  # mezo: no backward
        mem = accounting.layer_memory_elements(
            shape, o, i, **flags, adapter_rank=adapter, forward_only=forward_only,
            adapter_saves=saves,
        )  # fmt: skip
        row: LayerAccounting = {
            "name": name,
            "act_shape": list(shape),
            "out_features": o,
            "in_features": i,
            "rank": rank,
            "act_ranks": list(ranks) if ranks else None,
            "memory_elements": mem,
            "memory_mib_fp32": {k: v * 4 / MB for k, v in mem.items()},
            "flops_per_step": accounting.layer_step_flops(
                shape,
                o,
                i,
                **flags,
                adapter_rank=adapter,
                forward_only=forward_only,
                adapter_saves=saves,
            ),
        }
        if len(shape) == 3 and not method.adapter and not forward_only:
            row["flops_per_step_reference_code"] = accounting.reference_code_flops(
                shape, o, i, **flags
            )
        rows.append(row)
    return rows


def model_accounting(model: nn.Module) -> ModelAccounting:
    """Whole-model figures: parameters, and the parameters that train.

    Convention, as the BSR paper counts training memory: all weights, plus a gradient for
    each trainable parameter, plus the activations saved for backward (measured apart).
    """
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": trainable,
        "gradient_elements": trainable,
        "note": "trainable_parameters includes WASI factors L, R (parameters updated by WSI, "
        "not autograd); gradient_elements: one gradient element per trainable parameter "
        "(for WASI the factors' size; the dense gradient is never formed)",
    }
