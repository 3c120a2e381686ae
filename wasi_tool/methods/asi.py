"""asi: dense weight, Tucker-compressed saved activation (method.md section 2)."""

from __future__ import annotations

from torch import nn

from wasi_tool.methods.base import LayerOptions, Method, dense, register_method
from wasi_tool.nn.subspace import ASILinear


class ASI(Method):
    name = "asi"
    description = "dense weight, Tucker-compressed activations"
    compressed_activations = True

    def build_layer(self, layer: nn.Module, options: LayerOptions) -> nn.Module:
        return ASILinear.from_linear(
            dense(layer),
            options.act_ranks or (),
            options.seed,
            options.act_order,
            options.act_residual_rows,
        )


register_method(ASI)
