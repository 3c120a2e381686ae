"""A method that owns its optimiser and its step, added as one module plus one registration.

The method below trains without a backward pass (a two-point zeroth-order estimate from a
seeded perturbation, the shape of MeZO): its optimiser takes a closure that returns the loss,
and its ``step`` calls it. It trains end to end through ``finetune``, the training bench's
measurement and ``wasi_tool.prepare`` without any of them knowing it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
import torch
from torch import nn

import wasi_tool
from wasi_tool.methods import Method, StepOutput, register_method, unregister_method
from wasi_tool.methods.base import LayerOptions, Recipe, dense
from wasi_tool.nn.subspace import SubspaceLayer

NAME = "test-forward-only"
MU = 1e-3


class TwoPointSGD(torch.optim.Optimizer):
    """theta <- theta - lr * g z, g = (L(theta + mu z) - L(theta - mu z)) / (2 mu); z is drawn
    from a per-step seed and regenerated, never stored."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})
        self.steps = 0

    def _perturb(self, seed: int, scale: float) -> None:
        gen = torch.Generator().manual_seed(seed)
        for group in self.param_groups:
            for p in group["params"]:
                z = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                p.add_(z, alpha=scale)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        assert closure is not None, "a forward-only optimiser needs the loss closure"
        seed = 1000 + self.steps
        self._perturb(seed, MU)
        plus = closure()
        self._perturb(seed, -2 * MU)
        minus = closure()
        self._perturb(seed, MU)
        g = float(plus[0] - minus[0]) / (2 * MU)
        gen = torch.Generator().manual_seed(seed)
        for group in self.param_groups:
            for p in group["params"]:
                z = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                p.add_(z, alpha=-group["lr"] * g)
        self.steps += 1
        return (plus[0] + minus[0]) / 2, plus[1]


class ForwardOnly(Method):
    name = NAME
    description = "test: two forward passes per step, no backward"

    def build_layer(self, layer: nn.Module, options: LayerOptions) -> nn.Module:
        return dense(layer)

    def optimizer(self, model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
        return TwoPointSGD([p for p in model.parameters() if p.requires_grad], recipe.lr)

    def step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        forward: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> StepOutput:
        def closure() -> tuple[torch.Tensor, torch.Tensor]:
            with forward():
                logits = model(x)
            return loss_fn(logits, y), logits

        loss, logits = optimizer.step(closure)
        return StepOutput(loss.detach(), logits.detach())


@pytest.fixture
def forward_only() -> Iterator[Method]:
    method = register_method(ForwardOnly)
    try:
        yield method
    finally:
        unregister_method(NAME)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_finetune_trains_a_method_that_owns_its_step(forward_only: Method, tmp_path: Any) -> None:
    from wasi_tool.models.loading import ModelSource
    from wasi_tool.stages.finetune import FinetuneConfig, run_finetune

    src = ModelSource(arch="vit_tiny_patch16_224", img_size=32, random_init=True, seed=0)
    cfg = FinetuneConfig(
        method=NAME, targets="mlp", epochs=1, batch_size=8, max_steps=3, lr=1e-3, lr_min=1e-4
    )
    result = run_finetune(src, "digits", cfg, tmp_path / "ft")
    m = result.metrics
    assert m.method == NAME and m.measured.steps == 3
    assert m.measured.saved_bytes_per_step.total == 0  # no backward: nothing saved
    assert (tmp_path / "ft" / "model.safetensors").is_file()


def test_bench_measures_a_method_that_owns_its_step(forward_only: Method) -> None:
    from wasi_tool.bench.train import TrainBenchConfig, measure

    cfg = TrainBenchConfig(
        arch="vit_tiny_patch16_224", img_size=32, random_init=True, method=NAME,
        targets="mlp", batch_size=4, steps=2, warmup=1,
    )  # fmt: skip
    row = measure(cfg)  # the worker's measurement, in this process (the method is registered here)
    assert row.method == NAME and row.saved_bytes_total == 0
    assert row.median_step_seconds > 0


def test_prepare_returns_the_methods_optimiser(forward_only: Method) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 3))
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    model, opt = wasi_tool.prepare(model, NAME, "1", lr=1e-2, verbose=False)
    assert isinstance(opt, TwoPointSGD)
    before = _weights(model)
    loss_fn = torch.nn.functional.cross_entropy
    for _ in range(3):  # the user's loop: no backward, the optimiser runs the forwards
        opt.step(lambda: (loss_fn(model(x), y), None))
    after = _weights(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, SubspaceLayer) for m in model.modules())
