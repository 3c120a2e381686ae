"""vanilla: dense weights and full activations, trained by stock autograd."""

from __future__ import annotations

from torch import nn

from wasi_tool.methods.base import LayerOptions, Method, dense, register_method


class Vanilla(Method):
    name = "vanilla"
    description = "dense weight, full activations (stock autograd)"

    def build_layer(self, layer: nn.Module, options: LayerOptions) -> nn.Module:
        return dense(layer)


register_method(Vanilla)
