"""What a training method is, and the one registry of them.

A method decides what each target linear becomes for training (``build_layer``) and, for the
model-level baselines, what happens to the model around it: ``before_targets`` (BSR installs
token dropping and plans its blocks), ``restrict_targets`` (BSR keeps the targets inside its
trained blocks), ``after_swap`` (BSR freezes, LoRA injects adapters) and ``finalize_`` (LoRA
merges). Its flags say what the accounting and the optimiser need to know. A method may also
own its optimiser (``optimizer``: by default the one ``SubspaceSGD`` of every method) and its
step (``step``: by default forward, loss, backward, update), so that a method without a
backward pass (zeroth-order) or with another optimiser is one module too. Adding a method is
one module that subclasses ``Method`` and calls ``register_method`` (see methods/wasi.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.methods.optim import NonFiniteGradient, SubspaceSGD, first_non_finite_grad
from wasi_tool.methods.options import MethodOptions
from wasi_tool.nn.factored import FactoredLinear
from wasi_tool.nn.lossy import undo_lossy_
from wasi_tool.nn.recompute import undo_recompute_
from wasi_tool.nn.subspace import to_plain_
from wasi_tool.nn.swap import set_submodule
from wasi_tool.ops.wsi import UpdateForm

Note = Callable[[str], None]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Recipe(Protocol):
    """The optimiser settings a method reads (a FinetuneConfig has them)."""

    lr: float
    momentum: float
    weight_decay: float
    clip: float | None


class ModelPlan(Protocol):
    """What a model-level method decided before its targets were chosen (BSR's ``BSRPlan``:
    the trained blocks and where tokens drop); it crosses the method's hooks and is recorded
    in metrics.json by ``to_dict``."""

    def to_dict(self) -> dict[str, object]: ...


class NonFiniteLoss(WasiToolError):
    """The loss of a step is NaN or inf; nothing was updated."""

    def __init__(self, value: float) -> None:
        super().__init__(f"the loss is {value}; nothing was updated")
        self.value = value


@dataclass
class StepOutput:
    """What one training step of a method gives back: the (detached) loss and logits."""

    loss: torch.Tensor
    logits: torch.Tensor


def gradient_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    forward: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> StepOutput:
    """The default step: forward (inside ``forward()``, e.g. a saved-bytes meter), loss,
    backward, update. Raises ``NonFiniteLoss`` or ``NonFiniteGradient`` before any update."""
    with forward():
        logits = model(x)
    loss = loss_fn(logits, y)
    if not torch.isfinite(loss):
        raise NonFiniteLoss(float(loss.detach()))
    optimizer.zero_grad()
    loss.backward()
    # SubspaceSGD checks the global gradient norm it computes anyway (free); any other
    # optimiser gets the explicit scan
    if not isinstance(optimizer, SubspaceSGD):
        bad = first_non_finite_grad(model)
        if bad is not None:
            raise NonFiniteGradient(f"non-finite gradient in {bad}")
    optimizer.step()
    return StepOutput(loss.detach(), logits.detach())


@dataclass(frozen=True)
class LayerOptions:
    """What a method needs to build one target layer."""

    act_ranks: tuple[int, ...] | None
    form: UpdateForm = "projection"
    act_order: str = "sequential"
    seed: int = 0
    act_residual_rows: int = 0  # asi/wasi: sampled residual rows for an unbiased dW (0: off)


class Method:
    """Base class of the training methods; the defaults describe a per-layer method.

    Class attributes: ``name`` (the registry key and CLI value), ``description`` (one line),
    ``factored_weight`` (targets must be factored, weights train by WSI), ``compressed_activations``
    (targets need activation ranks), ``adapter`` (targets carry adapters of ``lora_rank``),
    ``options`` (the dataclass of the method's own settings, ``methods.options``; None: it has
    none). Methods may share an options class (lora and lora-fa: ``LoraOptions``).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[type[MethodOptions] | None] = None
    factored_weight: ClassVar[bool] = False
    compressed_activations: ClassVar[bool] = False
    adapter: ClassVar[bool] = False

    def build_layer(self, layer: nn.Module, options: LayerOptions) -> nn.Module:
        """The training module that replaces target ``layer``."""
        raise NotImplementedError

    def before_targets(self, model: nn.Module, settings: Any, note: Note) -> ModelPlan | None:
        """Model-level changes before targets are chosen; returns a plan (or None)."""
        return None

    def restrict_targets(self, targets: list[str], plan: ModelPlan | None) -> list[str]:
        return targets

    def after_swap(
        self,
        model: nn.Module,
        targets: list[str],
        settings: Any,
        plan: ModelPlan | None,
        note: Note,
    ) -> None:
        """Model-level changes once the targets are swapped (freezing, adapters)."""

    def plan_record(self, plan: ModelPlan | None) -> dict[str, object] | None:
        """What the model-level plan decided, for metrics.json (under the method's name)."""
        return None

    def model_accounting(
        self, model: nn.Module, plan: ModelPlan | None, example: Callable[[], Any]
    ) -> dict[str, object]:
        """Method-specific whole-model figures (BSR: tokens per block) on ``example()``."""
        return {}

    def finalize_(self, model: nn.Module) -> None:
        """Undo what only training needs (adapters merged); subspace layers are handled
        by ``wasi_tool.nn.to_plain_``."""

    def optimizer(self, model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
        """The optimiser of the prepared ``model``: SGD for ordinary parameters and the WSI
        update for factored layers, one global-norm clip (``SubspaceSGD``)."""
        return SubspaceSGD(model, recipe.lr, recipe.momentum, recipe.weight_decay, recipe.clip)

    def step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: LossFn,
        forward: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> StepOutput:
        """One training step on (x, y); forward passes run inside ``forward()`` (the caller's
        saved-bytes meter). Raise ``NonFiniteLoss``/``NonFiniteGradient`` before updating
        anything when a loss or gradient is not finite."""
        return gradient_step(model, optimizer, x, y, loss_fn, forward)


METHODS: dict[str, Method] = {}


def register_method(method: Method | type[Method]) -> Method:
    """Add a method (an instance or a class to instantiate) under its name; no duplicates."""
    instance = method() if isinstance(method, type) else method
    if not instance.name:
        raise ValueError("a method needs a name")
    if instance.name in METHODS:
        raise ValueError(f"method {instance.name!r} is already registered")
    METHODS[instance.name] = instance
    return instance


def unregister_method(name: str) -> None:
    METHODS.pop(name, None)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise WasiToolError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def options_classes() -> list[type[MethodOptions]]:
    """The registered methods' options classes, each once, in the registry's order."""
    found: list[type[MethodOptions]] = []
    for method in METHODS.values():
        if method.options is not None and method.options not in found:
            found.append(method.options)
    return found


def option_keys() -> dict[str, type[MethodOptions]]:
    """Every registered method's flat option key -> its options class (``lora_rank`` ->
    ``LoraOptions``): what recipes, stored configs and the CLI name."""
    return {key: cls for cls in options_classes() for key in cls.flat_keys().values()}


def methods_with(cls: type[MethodOptions]) -> list[str]:
    """The methods whose options are ``cls``."""
    return [name for name, method in METHODS.items() if method.options is cls]


def dense(layer: nn.Module) -> nn.Linear:
    """``layer`` as a dense nn.Linear (a FactoredLinear is multiplied out)."""
    if isinstance(layer, FactoredLinear):
        return layer.to_linear()
    if not isinstance(layer, nn.Linear):
        raise WasiToolError(f"targets must be linear layers, got {type(layer).__name__}")
    return layer


def factored(layer: nn.Module) -> FactoredLinear:
    if not isinstance(layer, FactoredLinear):
        raise WasiToolError("wsi/wasi need factored targets: run compress first")
    return layer


def prepare_(
    model: nn.Module,
    method: str | Method,
    targets: Sequence[str],
    options: Mapping[str, LayerOptions],
) -> None:
    """Swap each target layer of ``model`` in place for the method's training layer."""
    spec = get_method(method) if isinstance(method, str) else method
    for name in targets:
        opt = options[name]
        if spec.compressed_activations and not opt.act_ranks:
            raise WasiToolError(f"{spec.name} needs activation ranks for {name}")
        set_submodule(model, name, spec.build_layer(model.get_submodule(name), opt))


def finalize_(model: nn.Module, method: str | Method | None = None) -> None:
    """Back to plain modules for saving and export: the method's own step (LoRA merges its
    adapters), recompute regions back to their classes, every subspace layer to its plain
    module."""
    if method is not None:
        (get_method(method) if isinstance(method, str) else method).finalize_(model)
    undo_recompute_(model)
    undo_lossy_(model)
    to_plain_(model)
