"""wsi: factored weight trained by the WSI update, full saved activation (method.md section 3)."""

from __future__ import annotations

from torch import nn

from wasi_tool.methods.base import LayerOptions, Method, factored, register_method
from wasi_tool.nn.subspace import WASILinear


class WSI(Method):
    name = "wsi"
    description = "factored weight (WSI update), full activations"
    factored_weight = True

    def build_layer(self, layer: nn.Module, options: LayerOptions) -> nn.Module:
        return WASILinear.from_factored(factored(layer), None, options.form, options.seed)


register_method(WSI)
