"""The optimiser of every method: SGD for ordinary parameters, WSI for WASILinear layers,
with one global-norm gradient clip across both (method.md section 3)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.nn.subspace import WASILinear


class NonFiniteGradient(WasiToolError):
    """The global gradient norm is NaN or inf; nothing was updated."""


def _eager(name: str) -> Callable[..., Any]:
    """``torch.optim.Optimizer``'s own method ``name``, without the lazy
    ``torch._dynamo.disable`` torch wraps it in: that wrapper imports all of torch._dynamo
    (0.16 GB resident, issue 34) at its first call, and this optimiser is never compiled."""
    method = getattr(torch.optim.Optimizer, name)
    return getattr(method, "__wrapped__", method)


class SubspaceSGD(torch.optim.Optimizer):
    """SGD (momentum, weight decay) plus the factor-only WSI update, one clip for all.

    A ``torch.optim.Optimizer``: stock schedulers (they set each group's ``lr``), ``zero_grad``,
    ``state_dict`` and ``load_state_dict`` work as for SGD. Two parameter groups: the ordinary
    trainable parameters (SGD, as ``torch.optim.SGD`` with dampening 0, no Nesterov), and the
    factors L, R of every WASILinear (``subspace: True``), which never hold a ``.grad``: their
    layer's pending gradient factors are applied by one WSI power iteration at the group's lr.

    The global gradient norm counts every ordinary ``.grad`` and, for each WASILinear, the norm
    of its pending weight gradient ||P||_F (equal to ||G||_F); each factored layer's bias is an
    ordinary parameter. The clip factor ``c = min(1, clip / (norm + 1e-6))`` (as
    ``torch.nn.utils.clip_grad_norm_``) scales both the ordinary gradients and G. A
    non-finite norm raises ``NonFiniteGradient`` before anything is updated.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        clip: float | None = None,
    ) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, WASILinear)]
        if self.layers and momentum != 0.0:
            raise WasiToolError(
                "the WSI update has no momentum (the paper uses SGD with momentum 0); "
                "set momentum to 0 for wsi/wasi"
            )
        factors = [p for layer in self.layers for p in (layer.L, layer.R)]
        factor_ids = {id(p) for p in factors}
        params = [p for p in model.parameters() if p.requires_grad and id(p) not in factor_ids]
        groups: list[dict[str, Any]] = []
        if params:
            groups.append({"params": params, "subspace": False})
        if factors:
            groups.append({"params": factors, "subspace": True})
        if not groups:
            raise WasiToolError("nothing to train: the model has no trainable parameter")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(groups, defaults)
        self.clip = clip
        self.last_grad_norm = math.nan
        self.last_clip_coef = 1.0

    @property
    def lr(self) -> float:
        """The learning rate of the first group (all groups share one schedule)."""
        return float(self.param_groups[0]["lr"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        _eager("zero_grad")(self, set_to_none)
        for layer in self.layers:
            layer.discard_pending()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _eager("add_param_group")(self, param_group)

    def state_dict(self) -> Any:
        return _eager("state_dict")(self)

    def load_state_dict(self, state_dict: Any) -> None:
        _eager("load_state_dict")(self, state_dict)

    def _ordinary(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups if not g["subspace"] for p in g["params"]]

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of every pending gradient (ordinary and factored)."""
        sq = torch.zeros((), dtype=torch.float64)
        for p in self._ordinary():
            if p.grad is not None:
                sq += p.grad.detach().double().pow(2).sum()
        for layer in self.layers:
            sq += layer.grad_sq_norm().double()
        return sq.sqrt()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        norm = self.grad_norm()
        if not math.isfinite(float(norm)):
            raise NonFiniteGradient(f"the gradient norm is {float(norm)}; nothing was updated")
        coef = 1.0
        if self.clip is not None:
            coef = min(1.0, self.clip / (float(norm) + 1e-6))
            if coef < 1.0:
                for p in self._ordinary():
                    if p.grad is not None:
                        p.grad.mul_(coef)
        self.last_grad_norm, self.last_clip_coef = float(norm), coef
        for group in self.param_groups:
            if group["subspace"]:
                for layer in self.layers:
                    layer.subspace_step(group["lr"], group["weight_decay"], coef)
            else:
                self._sgd(group)
        return loss

    def _sgd(self, group: dict[str, Any]) -> None:
        """torch.optim.SGD's single-tensor update (dampening 0, no Nesterov, minimise)."""
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            d_p = p.grad if weight_decay == 0 else p.grad.add(p, alpha=weight_decay)
            if momentum != 0:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = torch.clone(d_p).detach()
                    state["momentum_buffer"] = buf
                else:
                    buf.mul_(momentum).add_(d_p)
                d_p = buf
            p.add_(d_p, alpha=-lr)


def first_non_finite_grad(model: nn.Module) -> str | None:
    """Name of the first parameter (or WASI layer's gradient factor) that is not finite."""
    for name, module in model.named_modules():
        pending = module.pending_grad if isinstance(module, WASILinear) else None
        if pending is not None and not bool(torch.isfinite(pending).all()):
            return f"{name} (WASI gradient factor P)"
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return name
    return None
