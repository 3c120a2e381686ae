"""The training methods, in one registry keyed by name.

Each method says what it does to a target linear: vanilla trains it densely with autograd;
asi keeps the dense weight and compresses the saved activation; wsi keeps the weight factored
(L, R) with full activations; wasi does both. Layers that are not targets train as usual.
Two model-level baselines add to that: bsr trains only a few blocks (targets inside them,
token dropping; methods/bsr.py), with dense targets or, as bsr+wasi, WASI ones; lora freezes
the model and trains peft adapters on the targets (methods/lora.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.nn.factored import FactoredLinear
from wasi_tool.nn.subspace import ASILinear, WASILinear
from wasi_tool.nn.swap import set_submodule
from wasi_tool.ops.wsi import UpdateForm


@dataclass(frozen=True)
class LayerOptions:
    """What a method needs to build one target layer."""

    act_ranks: tuple[int, ...] | None
    form: UpdateForm = "projection"
    act_order: str = "sequential"
    seed: int = 0


Swap = Callable[[nn.Module, LayerOptions], nn.Module]


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    factored_weight: bool
    compressed_activations: bool
    swap: Swap
    block_selective: bool = False
    lora: bool = False
    layer_method: str = ""  # what its target layers are, for accounting (default: name)

    @property
    def layer(self) -> str:
        return self.layer_method or self.name


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise WasiToolError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def _dense(layer: nn.Module) -> nn.Linear:
    if isinstance(layer, FactoredLinear):
        return layer.to_linear()
    assert isinstance(layer, nn.Linear)
    return layer


def _factored(layer: nn.Module) -> FactoredLinear:
    if not isinstance(layer, FactoredLinear):
        raise WasiToolError("wsi/wasi need factored targets: run compress first")
    return layer


def _vanilla(layer: nn.Module, opt: LayerOptions) -> nn.Module:
    return _dense(layer)


def _asi(layer: nn.Module, opt: LayerOptions) -> nn.Module:
    return ASILinear.from_linear(_dense(layer), opt.act_ranks or (), opt.seed, opt.act_order)


def _wsi(layer: nn.Module, opt: LayerOptions) -> nn.Module:
    return WASILinear.from_factored(_factored(layer), None, opt.form, opt.seed)


def _wasi(layer: nn.Module, opt: LayerOptions) -> nn.Module:
    return WASILinear.from_factored(
        _factored(layer), opt.act_ranks, opt.form, opt.seed, opt.act_order
    )


register(
    Method("vanilla", "dense weight, full activations (stock autograd)", False, False, _vanilla)
)
register(Method("asi", "dense weight, Tucker-compressed activations", False, True, _asi))
register(Method("wsi", "factored weight (WSI update), full activations", True, False, _wsi))
register(Method("wasi", "factored weight (WSI), Tucker-compressed activations", True, True, _wasi))
register(
    Method(
        "bsr",
        "chosen blocks + final norm + head train (dense), token dropping",
        False,
        False,
        _vanilla,
        block_selective=True,
        layer_method="vanilla",
    )
)
register(
    Method(
        "bsr+wasi",
        "bsr with WASI target layers inside the trained blocks",
        True,
        True,
        _wasi,
        block_selective=True,
        layer_method="wasi",
    )
)
register(
    Method(
        "lora",
        "frozen model, peft LoRA adapters on the targets + head",
        False,
        False,
        _vanilla,
        lora=True,
    )
)


def prepare_(
    model: nn.Module,
    method: str,
    targets: Sequence[str],
    options: Mapping[str, LayerOptions],
) -> None:
    """Swap each target layer of ``model`` in place for the method's training layer."""
    spec = get_method(method)
    for name in targets:
        opt = options[name]
        if spec.compressed_activations and not opt.act_ranks:
            raise WasiToolError(f"{method} needs activation ranks for {name}")
        new = spec.swap(model.get_submodule(name), opt)
        set_submodule(model, name, new)


def finalize_(model: nn.Module) -> None:
    """Swap training layers back to plain modules for saving and export (LoRA merged)."""
    from wasi_tool.methods.lora import merge_lora_

    merge_lora_(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, WASILinear):
            set_submodule(model, name, module.to_factored())
        elif isinstance(module, ASILinear):
            set_submodule(model, name, module.to_linear())
