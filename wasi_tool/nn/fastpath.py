"""PyTorch's fused transformer fast paths, declined where a target is no longer an nn.Linear.

``nn.TransformerEncoderLayer`` in eval mode, and ``nn.TransformerEncoder`` given a padding mask,
run fused kernels (``torch._transformer_encoder_layer_fwd``, nested tensors) that read
``linear1.weight`` / ``linear2.weight`` as dense matrices. A FactoredLinear (or a training
layer) has no dense weight, and materialising one would undo the compression. So when a swap
puts such a layer inside them, the fast path is declined through PyTorch's own switches:
the layer's ``activation_relu_or_gelu`` (read only by the fast-path check) is set to False and
the encoder's ``use_nested_tensor`` to False; both run the ordinary Python path, which is
mathematically the same. Putting nn.Linear layers back restores both. ``TransformerDecoderLayer``
has no fast path (nothing to decline); its linears work as they are.
"""

from __future__ import annotations

from torch import nn

_SAVED = "_wasi_fast_path"  # the layer's / encoder's original switch, while declined
_LINEARS = ("linear1", "linear2")


def _dense(layer: nn.TransformerEncoderLayer) -> bool:
    return all(type(getattr(layer, n, None)) in _LINEAR_TYPES for n in _LINEARS)


_LINEAR_TYPES = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _set(module: nn.Module, attr: str, declined: bool) -> None:
    if declined and not hasattr(module, _SAVED) and getattr(module, attr):  # on: decline it
        object.__setattr__(module, _SAVED, getattr(module, attr))
        setattr(module, attr, False)
    elif not declined and hasattr(module, _SAVED):
        setattr(module, attr, getattr(module, _SAVED))
        object.__delattr__(module, _SAVED)


def sync_fast_paths_(model: nn.Module, name: str) -> None:
    """After the submodule at ``name`` changed: decline (or restore) the fast paths of the
    encoder layer and encoder it sits in."""
    parts = name.split(".")
    for k in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:k])
        try:
            module = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            return
        if isinstance(module, nn.TransformerEncoderLayer):
            _set(module, "activation_relu_or_gelu", not _dense(module))
        elif isinstance(module, nn.TransformerEncoder):
            declined = any(
                isinstance(m, nn.TransformerEncoderLayer) and not _dense(m) for m in module.layers
            )
            _set(module, "use_nested_tensor", declined)


def fast_paths_given_up(model: nn.Module) -> list[str]:
    """One line per module whose fused fast path is declined (for reports and notes)."""
    lines = []
    for name, module in model.named_modules():
        if not hasattr(module, _SAVED):
            continue
        if isinstance(module, nn.TransformerEncoderLayer):
            what = "the fused eval kernel (torch._transformer_encoder_layer_fwd)"
        else:
            what = "nested-tensor padding in eval"
        lines.append(f"{name or type(module).__name__}: {what} given up (factored linears)")
    return lines
