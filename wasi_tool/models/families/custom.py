"""Plain PyTorch models: the user's own classes (models/custom.py; blocks are the layers of
their ``nn.TransformerEncoder``/``Decoder``s) and any module no other family claims.

A plain module follows timm's conventions where it shares them (blocks in ``blocks`` or
``layers.*.blocks``, heads from ``get_classifier``, timm's default data config), and a user
names modules as they like: its target presets are every family's (``mlp`` is timm's
``mlp.fc1``, Hugging Face's ``intermediate.dense``, PyTorch's ``linear1`` ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from wasi_tool.models import custom
from wasi_tool.models.families.base import InputSpec, ModelFamily, all_presets
from wasi_tool.models.families.timm import TimmFamily


class PlainFamily(TimmFamily):
    """Any module no other family claims (asked last)."""

    name = "plain"
    fallback = True
    block_layout = ""
    # PyTorch's own layer names; with every family's presets (see the module doc)
    presets: ClassVar[Mapping[str, tuple[str, ...]]] = {"mlp": ("*linear1", "*linear2")}

    def owns_arch(self, arch: str) -> bool:
        return False

    def arch_names(self) -> list[str]:
        return []

    def matches(self, model: nn.Module) -> bool:
        return True

    def preset(self, name: str) -> tuple[str, ...] | None:
        return all_presets().get(name)

    def preset_names(self) -> list[str]:
        return list(all_presets())


class CustomFamily(PlainFamily):
    """The user's own model (saved by ``wasi_tool.save_artifact``, arch ``custom``): its input
    is the recorded example input's shape; blocks are the layers of its
    ``nn.TransformerEncoder``s/Decoders; ``mlp`` also means their ``linear1``/``linear2``."""

    name = "custom"
    fallback = False
    block_layout = (
        "the layers of an `nn.TransformerEncoder`/`Decoder` (a model saved by save_artifact)"
    )
    attn_children = ("self_attn",)
    mlp_children = ()

    def owns_arch(self, arch: str) -> bool:
        return arch == custom.CUSTOM_ARCH

    def check_rebuild(self, kwargs: Mapping[str, Any], model_class: str | None, where: str) -> None:
        custom.check_named(str(kwargs.get("model_class")), model_class, where)

    def rebuild(self, arch: str, kwargs: Mapping[str, Any]) -> nn.Module:
        return custom.build_custom(custom.CustomRecord.from_kwargs(kwargs))

    def build(self, arch: str, **kwargs: Any) -> nn.Module:
        return ModelFamily.build(self, arch, **kwargs)

    def matches(self, model: nn.Module) -> bool:
        return custom.record_of(model) is not None

    def blocks(self, model: nn.Module) -> list[str]:
        return torch_transformer_layers(model) or super().blocks(model)

    def input_spec(self, model: nn.Module, model_kwargs: Mapping[str, Any]) -> InputSpec:
        record = custom.record_of(model) or custom.CustomRecord.from_kwargs(model_kwargs)
        shape = record.input_shape
        images = len(shape) == 4 and record.input_dtype.startswith("float")
        return InputSpec("images" if images else "tensor", int(shape[-1]), onnx_input="input")

    def example_input(
        self,
        model: nn.Module,
        spec: InputSpec,
        batch: int,
        seq_len: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        record = custom.record_of(model)
        assert record is not None
        return custom.example_like(record, batch, generator)


def torch_transformer_layers(model: nn.Module) -> list[str]:
    """The layers of every ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` in ``model``
    (the repeated blocks of a model written on PyTorch's own transformer)."""
    kinds = (nn.TransformerEncoder, nn.TransformerDecoder)
    return [
        f"{name}.layers.{i}" if name else f"layers.{i}"
        for name, m in model.named_modules()
        if isinstance(m, kinds)
        for i in range(len(m.layers))
    ]
