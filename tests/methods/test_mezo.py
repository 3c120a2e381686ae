"""mezo: the zeroth-order baseline (method.md section 10).

The update is checked against the two-point estimate computed densely by hand on a flat
parameter vector (the same seeded z); the step saves nothing for backward and its live tensors
stay at an inference pass's; it trains through finetune, the bench measurement and
wasi_tool.prepare, and a resumed optimiser draws the same perturbations.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import wasi_tool
from wasi_tool.errors import WasiToolError
from wasi_tool.measure import LiveTensorMeter, SavedBytesMeter
from wasi_tool.methods import get_method
from wasi_tool.methods.mezo import MeZO, MezoOptions, step_seed
from wasi_tool.training.config import FinetuneConfig
from wasi_tool.training.loop import train_step
from wasi_tool.training.loss import task_loss


def _toy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def _dense_reference(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
    step: int,
    lr: float,
    mu: float,
    wd: float,
    clip: float | None,
) -> torch.Tensor:
    """theta - lr (c g z + wd theta) on the flat vector theta (a float64 model, so the
    finite difference is not lost to float32 rounding), z drawn in the same order from the
    same seed."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    gen = torch.Generator().manual_seed(step_seed(seed, step))
    z = torch.cat([torch.randn(s, generator=gen, dtype=torch.float64).reshape(-1) for s in shapes])
    dmodel = copy.deepcopy(model)

    def loss(vec: torch.Tensor) -> torch.Tensor:
        params, at = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = vec[at : at + math.prod(s)].reshape(s)
            at += math.prod(s)
        return F.cross_entropy(functional_call(dmodel, params, (x,)), y)

    g = float(loss(theta + mu * z) - loss(theta - mu * z)) / (2 * mu)
    coef = 1.0 if clip is None else min(1.0, clip / (abs(g) * float(z.norm()) + 1e-6))
    return theta - lr * (coef * g * z + wd * theta)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_update_equals_the_two_point_estimate(clip: float | None) -> None:
    model, (x, y) = _toy().double(), _batch()
    x = x.double()
    lr, mu, wd, seed = 0.05, 1e-3, 0.01, 7
    opt = MeZO(model.parameters(), lr, mu, wd, clip, seed)
    for step in range(2):  # two steps: the seed moves with the step counter
        expected = _dense_reference(
            model, x, y, seed=seed, step=step, lr=lr, mu=mu, wd=wd, clip=clip
        )
        before = _flat(model)
        loss = opt.step(lambda: F.cross_entropy(model(x), y))
        torch.testing.assert_close(_flat(model), expected, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(_flat(model), before)
        assert torch.isfinite(loss)
    if clip is not None:  # the clip bound the estimated gradient's norm: the step is lr * clip
        assert opt.last_clip_coef < 1.0
        assert opt.last_grad_norm * opt.last_clip_coef == pytest.approx(clip, rel=1e-3)


def test_resume_draws_the_same_perturbations() -> None:
    model, (x, y) = _toy(), _batch()
    opt = MeZO(model.parameters(), 0.05, 1e-3, 0.0, None, 3)
    closure: Callable[[], Any] = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    for _ in range(2):
        opt.step(closure)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["mezo"] == {"steps": 2, "seed": 3, "mu": 1e-3}
    opt.step(closure)
    straight = _flat(model)

    other = _toy(seed=5)
    other.load_state_dict(saved_model)
    resumed = MeZO(other.parameters(), 0.05, 1e-3, 0.0, None, 0)  # seed restored from the state
    resumed.load_state_dict(saved_opt)
    resumed.step(lambda: F.cross_entropy(other(x), y))
    torch.testing.assert_close(_flat(other), straight, rtol=0, atol=0)


def test_a_non_finite_loss_updates_nothing() -> None:
    from wasi_tool.methods import NonFiniteLoss

    model, (x, _) = _toy(), _batch()
    opt = MeZO(model.parameters(), 0.05)
    before = _flat(model)
    with pytest.raises(NonFiniteLoss):
        opt.step(lambda: model(x).sum() * float("nan"))
    torch.testing.assert_close(_flat(model), before, rtol=0, atol=1e-7)  # restored to rounding
    assert opt.steps == 0


def test_settings_are_checked() -> None:
    with pytest.raises(WasiToolError, match="mezo_mu"):
        FinetuneConfig.from_flat(method="mezo", mezo_mu=0.0)
    with pytest.raises(WasiToolError, match="momentum"):
        get_method("mezo").optimizer(_toy(), FinetuneConfig(method="mezo", momentum=0.9))
    with pytest.raises(WasiToolError, match="closure"):
        MeZO(_toy().parameters(), 0.1).step()
    from wasi_tool.bench.train import TrainBenchConfig

    cfg = TrainBenchConfig.from_flat(method="mezo", mezo_mu=1e-2).method_config()
    # the bench passes the method's option to its worker's run
    assert cfg.options == MezoOptions(mu=1e-2)
    opt = get_method("mezo").optimizer(_toy(), cfg)
    assert isinstance(opt, MeZO) and opt.mu == 1e-2 and opt.seed == cfg.seed


def test_a_step_saves_nothing_for_backward(tiny_model: Callable[..., nn.Module]) -> None:
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    counted = {}
    for name in ("vanilla", "mezo"):
        model = tiny_model()
        method = get_method(name)
        opt = method.optimizer(model, FinetuneConfig(method=name, lr=1e-3, lr_min=1e-3))
        meter = SavedBytesMeter(model)
        result = train_step(model, opt, x, y, method=method, meter=meter)
        meter.remove()
        assert math.isfinite(result.loss)
        counted[name] = result.saved_total
    assert counted["vanilla"] > 1_000_000  # the meter sees a backward's saved tensors
    assert counted["mezo"] == 0


def test_peak_live_tensors_are_an_inference_pass(tiny_model: Callable[..., nn.Module]) -> None:
    """What is counted: the high-water mark of live tensors made during the call, over the
    weights and the batch (LiveTensorMeter). The inference pass is the same train-mode forward
    and loss under no_grad; MeZO may add the z of its largest parameter (one parameter's z is
    live at a time) and the first forward's logits. The method's step is metered, not
    train_step: train_step's finiteness check detaches every parameter, and the meter counts
    those views of the weights as new storages (the whole model's bytes, for every method)."""
    model = tiny_model()
    model.train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with torch.no_grad(), LiveTensorMeter() as inference:
        task_loss(model(x), y)
    method = get_method("mezo")
    opt = method.optimizer(model, FinetuneConfig(method="mezo", lr=1e-3, lr_min=1e-3))
    train_step(model, opt, x, y, method=method)  # a first step (lazy state, if any)
    with LiveTensorMeter() as step:
        method.step(model, opt, x, y, task_loss)
    largest_z = max(p.numel() * p.element_size() for p in model.parameters())
    assert 0.9 * inference.peak <= step.peak <= 1.1 * inference.peak + largest_z
    with LiveTensorMeter() as backward:  # contrast: a gradient step holds far more
        vanilla = get_method("vanilla")
        sgd = vanilla.optimizer(model, FinetuneConfig(method="vanilla", lr=1e-3, lr_min=1e-3))
        vanilla.step(model, sgd, x, y, task_loss)
    assert backward.peak > 2 * step.peak


def test_finetune_trains_with_mezo(tmp_path: Path) -> None:
    from wasi_tool.models.loading import ModelSource
    from wasi_tool.stages.finetune import run_finetune

    src = ModelSource(arch="vit_tiny_patch16_224", img_size=32, random_init=True, seed=0)
    cfg = FinetuneConfig(
        method="mezo", targets="mlp", epochs=1, batch_size=8, max_steps=3, lr=1e-3, lr_min=1e-4
    )
    result = run_finetune(src, "digits", cfg, tmp_path / "ft")
    m = result.metrics
    assert m.method == "mezo" and m.measured.steps == 3
    assert m.measured.saved_bytes_per_step.total == 0
    assert m.final is not None and math.isfinite(m.final.train_loss)
    assert math.isfinite(m.final.test_loss)
    rows = m.analytic["layers"]
    assert rows and all(r["memory_elements"]["activation"] == 0 for r in rows)


def test_bench_measures_mezo() -> None:
    from wasi_tool.bench.train import TrainBenchConfig, measure

    cfg = TrainBenchConfig(
        arch="vit_tiny_patch16_224", img_size=32, random_init=True, method="mezo",
        targets="mlp", batch_size=4, steps=2, warmup=1,
    )  # fmt: skip
    row = measure(cfg)  # the worker's measurement, in this process
    assert row.method == "mezo" and row.saved_bytes_total == 0
    assert row.live_tensor_peak_bytes is not None and row.live_tensor_peak_bytes > 0


def test_prepare_gives_a_closure_optimiser_that_learns() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    x = torch.randn(64, 4)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model, opt = wasi_tool.prepare(model, "mezo", "0", lr=0.05, clip=None, verbose=False)
    assert isinstance(opt, MeZO)
    first = float(F.cross_entropy(model(x), y))
    for _ in range(300):  # the user's loop: no backward; the optimiser runs both forwards
        loss = opt.step(lambda: F.cross_entropy(model(x), y))
    last = float(F.cross_entropy(model(x), y))
    assert math.isfinite(float(loss)) and last < 0.7 * first


@pytest.mark.parametrize("command", ["finetune", "bench"])
def test_the_cli_passes_mezo_mu(command: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wasi_tool.cli.app import app

    flags = ["--arch", "vit_tiny_patch16_224", "--img-size", "32", "--random-init"]
    args = (
        ["finetune", "--out", str(tmp_path / "ft")]
        if command == "finetune"
        else ["bench", "--train"]
    )
    result = CliRunner().invoke(app, [*args, *flags, "--method", "mezo", "--mezo-mu", "-1"])
    assert result.exit_code == 1
    assert "mezo_mu must be a finite number > 0, got -1.0" in result.output
    assert not (tmp_path / "ft").exists()
