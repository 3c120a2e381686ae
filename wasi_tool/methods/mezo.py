"""mezo: zeroth-order fine-tuning, two forward passes and no backward (method.md section 10).

Per step a seed s is drawn (a function of the run's seed and the step counter); z ~ N(0, I)
over every trainable parameter is generated from s, one parameter at a time from one
``torch.Generator`` seeded with s, and regenerated whenever it is needed: it is never stored
whole. With theta the trainable parameters:

    L+ = loss(theta + mu z), L- = loss(theta - mu z)   (two forwards, no autograd)
    g  = (L+ - L-) / (2 mu)                             (the projected gradient, a scalar)
    theta <- theta - lr (c g z + wd theta)              (c: the recipe's clip, below)

Three passes over the parameters regenerate z: +mu z, -2 mu z, then the restore and the update
in one (MeZO's reference code makes four). The two forwards see the same torch RNG state, so a
model with dropout is perturbed, not re-sampled.

Memory is that of inference: nothing is saved for backward, and on top of the forward's own
workspace a step holds z of one parameter at a time (the largest one at worst) and the logits
of the first forward. Every trainable parameter is perturbed, as in the paper (full-parameter
MeZO); the targets only name the layers the accounting reports.

Settings: ``mezo_mu`` (the perturbation scale, default 1e-3) and the recipe's lr, weight decay
and clip. ``clip`` is the global-norm clip of every method applied to the estimated gradient
g z, whose norm |g| ||z|| is known for free (||z||^2 is summed while perturbing): the step is
scaled by c = min(1, clip / (|g| ||z|| + 1e-6)). ``clip=None`` is the paper's MeZO exactly.
Momentum would store a buffer of every parameter, which is what MeZO avoids: it is refused.
The paper's learning rates are 1e-6..1e-4 for LLMs (with no clip); docs/methods-baselines.md
gives what works on digits.

Federated: what travels is the whole trainable state, as for every method (MeZO could send the
seeds and the scalars g only; that is not done).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.methods.base import (
    LayerOptions,
    LossFn,
    Method,
    NonFiniteLoss,
    Recipe,
    StepOutput,
    dense,
    register_method,
)
from wasi_tool.methods.options import MethodOptions, options_of

DEFAULT_MU = 1e-3


@dataclass
class MezoOptions(MethodOptions):
    """mezo's options.

    Args:
        mu: the scale of the seeded perturbation (default 1e-3, the paper's; lr ~1e-4 without
            clip).
    """

    prefix: ClassVar[str] = "mezo_"

    mu: float = DEFAULT_MU

    def check(self) -> None:
        mu = float(self.mu)
        if not (math.isfinite(mu) and mu > 0):
            raise WasiToolError(f"mezo_mu must be a finite number > 0, got {self.mu}")
        self.mu = mu


def step_seed(seed: int, step: int) -> int:
    """The perturbation seed of ``step`` in a run seeded ``seed`` (a 63-bit integer)."""
    return (int(seed) * 1_000_003 + int(step) * 7_919 + 17) % (2**63 - 1)


def _loss_of(out: Any) -> tuple[torch.Tensor, Any]:
    """A closure returns the loss, or (loss, logits)."""
    if isinstance(out, tuple | list):
        return out[0], out[1] if len(out) > 1 else None
    return out, None


class MeZO(torch.optim.Optimizer):
    """The MeZO update as a ``torch.optim.Optimizer`` whose ``step`` takes the loss closure.

    ``step(closure)`` runs the closure twice (it must run the forward and return the loss, or
    (loss, logits)), under ``torch.no_grad``, and returns ((L+ + L-) / 2, the first forward's
    logits) when the closure returns a pair, else (L+ + L-) / 2: the loss at theta to O(mu^2).
    A non-finite L+ or L- raises ``NonFiniteLoss`` with the parameters restored (nothing
    updated). ``state_dict`` carries the step counter and the seed, so a resumed run draws the
    same perturbations as an uninterrupted one. Schedulers drive each group's ``lr``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        mu: float = DEFAULT_MU,
        weight_decay: float = 0.0,
        clip: float | None = None,
        seed: int = 0,
    ) -> None:
        if not (math.isfinite(mu) and mu > 0):
            raise WasiToolError(f"mezo: mu must be > 0, got {mu}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        if not any(group["params"] for group in self.param_groups):
            raise WasiToolError("nothing to train: the model has no trainable parameter")
        self.mu, self.clip, self.seed = float(mu), clip, int(seed)
        self.steps = 0
        self.last_projected_grad = math.nan  # g of the last step
        self.last_grad_norm = math.nan  # |g| ||z||: the norm of the estimated gradient
        self.last_clip_coef = 1.0

    @property
    def lr(self) -> float:
        return float(self.param_groups[0]["lr"])

    def _params(self) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        return [(p, g) for g in self.param_groups for p in g["params"]]

    def _each_z(self, seed: int) -> Iterable[tuple[torch.Tensor, dict[str, Any], torch.Tensor]]:
        """(parameter, its group, its z) in a fixed order, z regenerated from ``seed``: one
        generator per device, seeded alike."""
        gens: dict[torch.device, torch.Generator] = {}
        for p, group in self._params():
            gen = gens.get(p.device)
            if gen is None:
                gen = gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            yield p, group, torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device)

    def perturb_(self, seed: int, scale: float, norm: bool = False) -> float:
        """theta += scale z(seed); with ``norm``, returns ||z||^2 (each parameter's part a dot
        product, no copy of z)."""
        sq = 0.0
        for p, _, z in self._each_z(seed):
            p.add_(z, alpha=scale)
            if norm:
                flat = z.reshape(-1)
                sq += float(torch.dot(flat, flat))
        return sq

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is None:
            raise WasiToolError(
                "mezo's optimiser needs the loss closure: opt.step(lambda: loss_fn(model(x), y))"
            )
        seed = step_seed(self.seed, self.steps)
        mu = self.mu
        rng = torch.get_rng_state()  # both forwards see the same dropout masks
        z_sq = self.perturb_(seed, mu, norm=True)
        plus, logits = _loss_of(closure())
        plus = plus.detach()
        if not bool(torch.isfinite(plus)):
            self.perturb_(seed, -mu)
            raise NonFiniteLoss(float(plus))
        after = torch.get_rng_state()
        torch.set_rng_state(rng)
        self.perturb_(seed, -2 * mu)
        minus, _ = _loss_of(closure())
        minus = minus.detach()
        torch.set_rng_state(after)
        if not bool(torch.isfinite(minus)):
            self.perturb_(seed, mu)
            raise NonFiniteLoss(float(minus))
        g = float(plus.double() - minus.double()) / (2 * mu)
        norm = abs(g) * math.sqrt(z_sq)
        coef = 1.0
        if self.clip is not None:
            coef = min(1.0, self.clip / (norm + 1e-6))
        # restore theta (+mu z) and update it, z regenerated once more
        for p, group, z in self._each_z(seed):
            p.add_(z, alpha=mu)
            if group["weight_decay"]:
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
            p.add_(z, alpha=-group["lr"] * coef * g)
        self.steps += 1
        self.last_projected_grad, self.last_grad_norm, self.last_clip_coef = g, norm, coef
        loss = (plus + minus) / 2
        return (loss, logits) if logits is not None else loss

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["mezo"] = {"steps": self.steps, "seed": self.seed, "mu": self.mu}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        info = state.pop("mezo", None)
        super().load_state_dict(state)
        if info is not None:
            self.steps, self.seed, self.mu = int(info["steps"]), int(info["seed"]), info["mu"]


class Mezo(Method):
    """Dense model, every parameter trained by the two-point zeroth-order estimate."""

    name = "mezo"
    description = "zeroth-order (MeZO): two forwards per step, no backward, nothing saved"
    forward_only: ClassVar[bool] = True  # the accounting: no activation is stored
    options = MezoOptions

    def build_layer(self, layer: nn.Module, options: LayerOptions) -> nn.Module:
        return dense(layer)

    def optimizer(self, model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
        if recipe.momentum != 0:
            raise WasiToolError(
                "mezo has no momentum (a buffer per parameter is what it avoids): set momentum 0"
            )
        return MeZO(
            [p for p in model.parameters() if p.requires_grad],
            recipe.lr,
            options_of(recipe, MezoOptions).mu,
            recipe.weight_decay,
            recipe.clip,
            int(getattr(recipe, "seed", 0)),
        )

    def step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: LossFn,
        forward: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> StepOutput:
        def closure() -> tuple[torch.Tensor, torch.Tensor]:
            with forward():
                logits = model(x)
            return loss_fn(logits, y), logits

        out: Any = optimizer.step(closure)  # type: ignore[arg-type]  # MeZO's closure: a pair
        loss, logits = out
        return StepOutput(loss.detach(), logits.detach())


register_method(Mezo)
