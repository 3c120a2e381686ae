"""The optimiser of every method: SGD for ordinary parameters, WSI for WASILinear layers,
with one global-norm gradient clip across both (method.md section 3)."""

from __future__ import annotations

import math

import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.nn.subspace import WASILinear


class SubspaceSGD:
    """SGD (momentum, weight decay) plus the factor-only WSI update, one clip for all.

    The global gradient norm counts every ordinary ``.grad`` and, for each WASILinear, the
    norm of its pending weight gradient ||P||_F (equal to ||G||_F); each factored layer's
    bias is an ordinary parameter. The clip factor ``c = min(1, clip / (norm + 1e-6))`` (as
    ``torch.nn.utils.clip_grad_norm_``) scales both the ordinary gradients and G.
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
        factor_ids = {id(p) for layer in self.layers for p in (layer.L, layer.R)}
        self.params = [p for p in model.parameters() if p.requires_grad and id(p) not in factor_ids]
        self.weight_decay = weight_decay
        self.clip = clip
        # torch.optim needs at least one parameter; a model of WASI layers alone still has LRs.
        holder = self.params or [nn.Parameter(torch.zeros(()))]
        self.sgd = torch.optim.SGD(holder, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.last_grad_norm = math.nan
        self.last_clip_coef = 1.0

    @property
    def lr(self) -> float:
        return float(self.sgd.param_groups[0]["lr"])

    def zero_grad(self) -> None:
        self.sgd.zero_grad(set_to_none=True)
        for layer in self.layers:
            layer.sink.clear()

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of every pending gradient (ordinary and factored)."""
        sq = torch.zeros((), dtype=torch.float64)
        for p in self.params:
            if p.grad is not None:
                sq += p.grad.detach().double().pow(2).sum()
        for layer in self.layers:
            sq += layer.grad_sq_norm().double()
        return sq.sqrt()

    @torch.no_grad()
    def step(self) -> None:
        norm = self.grad_norm()
        coef = 1.0
        if self.clip is not None:
            coef = min(1.0, self.clip / (float(norm) + 1e-6))
            if coef < 1.0:
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(coef)
        self.last_grad_norm, self.last_clip_coef = float(norm), coef
        self.sgd.step()
        for layer in self.layers:
            layer.subspace_step(self.lr, self.weight_decay, coef)

    def state_dict(self) -> dict[str, object]:
        return {"sgd": self.sgd.state_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.sgd.load_state_dict(state["sgd"])  # type: ignore[arg-type]
