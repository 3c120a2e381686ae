"""wasi: factored weight (WSI) and Tucker-compressed activations (ASI) in one layer."""

from __future__ import annotations

from torch import nn

from wasi_tool.methods.base import LayerOptions, Method, factored, register_method
from wasi_tool.nn.subspace import WASILinear


def build_wasi_layer(layer: nn.Module, options: LayerOptions) -> nn.Module:
    return WASILinear.from_factored(
        factored(layer),
        options.act_ranks,
        options.form,
        options.seed,
        options.act_order,
        options.act_residual_rows,
    )


class WASI(Method):
    name = "wasi"
    description = "factored weight (WSI), Tucker-compressed activations"
    factored_weight = True
    compressed_activations = True

    def build_layer(self, layer: nn.Module, options: LayerOptions) -> nn.Module:
        return build_wasi_layer(layer, options)


register_method(WASI)
