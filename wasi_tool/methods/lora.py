"""LoRA baselines through the ``peft`` library: adapters on the target linears, merged back
into plain dense linears for saving and export.

Trainable: the adapters (A, B) and the classifier head; everything else is frozen (peft's
default plus the head, which a new task needs). At initialisation B = 0, so the model's
output is unchanged.

What a target saves for backward (its base W is frozen, so W x saves nothing), per token:
- ``lora``: the adapter's input x (I, for dA = (B^T dY)^T x) and x A^T (r, for dB);
- ``lora`` with ``lora_recompute`` (memory-exact LoRA): x only; x A^T is recomputed in
  backward (one extra GEMM of 2 T I r), the gradients are the same;
- ``lora-fa`` (LoRA-FA, arXiv 2308.03303): A is frozen at its random init and only B trains,
  so x is not needed: x A^T (r) only. peft's ``create_lorafa_optimizer`` also rescales B's
  gradient (LoRA-FA's optimiser); that is not done here: B trains by the recipe's SGD.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.methods.base import (
    LayerOptions,
    Method,
    ModelPlan,
    Note,
    dense,
    register_method,
)
from wasi_tool.methods.options import MethodOptions, options_of
from wasi_tool.models.families import family_of
from wasi_tool.nn.fastpath import sync_fast_paths_
from wasi_tool.nn.swap import set_submodule


@dataclass
class LoraOptions(MethodOptions):
    """lora's and lora-fa's options (flat keys ``lora_<field>``).

    Args:
        rank: the adapters' rank r.
        alpha: their scale alpha (the update is scaled by alpha / r).
        dropout: dropout on the adapters' input.
        recompute: memory-exact LoRA (lora only): recompute x A^T in backward instead of
            saving it (same gradients).
        fa_projection: lora-fa only: project B's gradient by (r / alpha)^2 (A A^T)^-1, as
            LoRA-FA's optimiser (off: plain SGD on B, see docs/methods-baselines.md).
    """

    prefix: ClassVar[str] = "lora_"

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    recompute: bool = False
    fa_projection: bool = False

    def check(self) -> None:
        if int(self.rank) < 1:
            raise WasiToolError(f"lora_rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise WasiToolError(f"lora_dropout must be in [0, 1), got {self.dropout}")


class LowRankRecompute(torch.autograd.Function):
    """y = (x A^T) B^T saving x only: backward recomputes h = x A^T (memory-exact LoRA)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, a, b)
        return (x @ a.T) @ b.T

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, a, b = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dh = dy @ b  # (T, r)
        grad_x = (dh @ a).reshape(x.shape) if ctx.needs_input_grad[0] else None
        grad_a = dh.T @ x2 if ctx.needs_input_grad[1] else None
        grad_b = dy.T @ (x2 @ a.T) if ctx.needs_input_grad[2] else None  # h, recomputed
        return grad_x, grad_a, grad_b


def _recompute_linear_class() -> type[nn.Module]:
    from peft.tuners.lora.layer import Linear

    class RecomputeLoraLinear(Linear):
        """peft's LoRA Linear whose adapters save only their input (``LowRankRecompute``);
        merged, disabled, mixed-batch and variant (DoRA...) forwards are peft's own."""

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if self.disable_adapters or self.merged or self.lora_variant or kwargs:
                return super().forward(x, *args, **kwargs)
            self._check_forward_args(x, *args, **kwargs)
            result = self.base_layer(x, *args)
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                a: torch.Tensor = self.lora_A[name].weight  # type: ignore[assignment]
                b: torch.Tensor = self.lora_B[name].weight  # type: ignore[assignment]
                h = self._cast_input_dtype(self.lora_dropout[name](x), a.dtype)
                result = result + LowRankRecompute.apply(h, a, b) * self.scaling[name]
            return result

    return RecomputeLoraLinear


_RECOMPUTE: list[type[nn.Module]] = []


def recompute_linear_class() -> type[nn.Module]:
    """The memory-exact LoRA layer class (built once: peft is imported only when used)."""
    if not _RECOMPUTE:
        _RECOMPUTE.append(_recompute_linear_class())
    return _RECOMPUTE[0]


def apply_lora_(
    model: nn.Module,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    seed: int = 0,
    recompute: bool = False,
) -> None:
    """Inject LoRA adapters into exactly the ``targets`` linears of ``model`` (in place);
    ``recompute``: memory-exact adapters that save only their input."""
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
    if recompute:
        config._register_custom_module({nn.Linear: recompute_linear_class()})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model)
    for name in targets:  # peft swapped them in itself: decline the fused kernels that would
        sync_fast_paths_(model, name)  # read linear.weight and skip the adapters in eval
    if not family_of(model).task(model).fits_head:  # the vocabulary head is pretrained: frozen
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
    """Frozen model, peft LoRA adapters on the targets, trainable head; merged on save.

    ``adapter_saves`` says what each target saves for backward (the accounting): "both" (x and
    x A^T), "input" (x: ``lora_recompute``), "projection" (x A^T: lora-fa)."""

    name = "lora"
    description = "frozen model, peft LoRA adapters on the targets + head"
    adapter = True
    adapter_saves: ClassVar[str] = "both"
    options = LoraOptions

    def build_layer(self, layer: nn.Module, options: LayerOptions) -> nn.Module:
        return dense(layer)

    def after_swap(
        self,
        model: nn.Module,
        targets: list[str],
        settings: Any,
        plan: ModelPlan | None,
        note: Note,
    ) -> None:
        own = options_of(settings, LoraOptions)
        recompute = own.recompute
        apply_lora_(
            model,
            targets,
            own.rank,
            own.alpha,
            own.dropout,
            settings.seed,
            recompute=recompute,
        )
        if recompute:
            note("lora_recompute: adapters save their input only; x A^T is recomputed")

    def finalize_(self, model: nn.Module) -> None:
        merge_lora_(model)


class LoRAFA(LoRA):
    """LoRA-FA: LoRA with A frozen at its random init; B and the head train.

    With ``lora_fa_projection`` (off by default), each B's gradient is projected as LoRA-FA's
    optimiser does (arXiv 2308.03303; peft's ``create_lorafa_optimizer``): g_B <- (r / alpha)^2
    g_B (A A^T + delta I)^+, the B update whose product B A comes closest (Frobenius) to the
    full weight gradient's step. A is frozen, so the r x r inverse is computed once. peft builds
    it into AdamW; here it is a step pre-hook of the recipe's SGD, so the clip sees the projected
    gradient."""

    name = "lora-fa"
    description = "frozen model and LoRA A; B (and the head) train; saves x A^T only"
    adapter_saves = "projection"

    def after_swap(
        self,
        model: nn.Module,
        targets: list[str],
        settings: Any,
        plan: ModelPlan | None,
        note: Note,
    ) -> None:
        if options_of(settings, LoraOptions).recompute:
            raise WasiToolError(
                "lora_recompute is for lora: lora-fa already saves only x A^T (r per token), "
                "less than the input a recompute would keep"
            )
        super().after_swap(model, targets, settings, plan, note)
        for name in lora_layers(model):
            for p in model.get_submodule(name).lora_A.parameters():  # type: ignore[union-attr]
                p.requires_grad_(False)

    def optimizer(self, model: nn.Module, recipe: Any) -> torch.optim.Optimizer:
        opt = super().optimizer(model, recipe)
        if options_of(recipe, LoraOptions).fa_projection:
            pairs = projections(model)
            opt.register_step_pre_hook(lambda optimizer, args, kwargs: project_(pairs))
        return opt


FA_DELTA = 1e-8  # peft's regulariser of A A^T


def projections(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(B, (r / alpha)^2 (A A^T + delta I)^+) of every adapter of ``model`` (A frozen)."""
    pairs = []
    for name in lora_layers(model):
        layer: Any = model.get_submodule(name)
        for key in layer.lora_A:
            a = layer.lora_A[key].weight.detach().to(torch.float64)
            gram = a @ a.T + FA_DELTA * torch.eye(a.shape[0], dtype=torch.float64)
            inverse = torch.linalg.pinv(gram, hermitian=True) / float(layer.scaling[key]) ** 2
            b = layer.lora_B[key].weight
            pairs.append((b, inverse.to(b.dtype)))
    return pairs


def project_(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """g_B <- g_B M for each (B, M), in place (before the optimiser's step)."""
    with torch.no_grad():
        for b, inverse in pairs:
            if b.grad is not None:
                b.grad.copy_(b.grad @ inverse)


register_method(LoRA)
register_method(LoRAFA)
