"""asi-fixed / wasi-fixed: bases from a one-shot HOSVD on the first batch, then projection only.

No QR, eigendecomposition or subspace iteration runs after calibration (counted by patching
the ops functions); at full ranks training equals exact training (vanilla, wsi); what a step
saves matches the formula; it trains through finetune, the bench and prepare.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import wasi_tool
from wasi_tool.measure import SavedBytesMeter
from wasi_tool.methods import LayerOptions, SubspaceSGD, get_method, prepare_
from wasi_tool.methods.fixed import FixedActivationBases, FixedASILinear, FixedWASILinear
from wasi_tool.nn.factored import FactoredLinear
from wasi_tool.training.config import FinetuneConfig
from wasi_tool.training.loop import train_step


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class Toy(nn.Module):
    """Tokens (B, N, C) through one residual MLP block, mean-pooled to 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = Block(), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x).mean(1))


TARGETS = ["block.fc1", "block.fc2"]


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, 12, generator=gen), torch.randint(0, 3, (6,), generator=gen)


def _prepared(method: str, ranks: tuple[int, ...], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Toy()
    if get_method(method).factored_weight:  # full-rank factors: WSI is exact
        for name in TARGETS:
            layer = model.get_submodule(name)
            u, s, vh = torch.linalg.svd(layer.weight.detach(), full_matrices=False)
            f = FactoredLinear.from_factors(u, s[:, None] * vh, layer.bias)
            setattr(model.block, name.split(".")[1], f)
    prepare_(model, method, TARGETS, {n: LayerOptions(ranks) for n in TARGETS})
    return model.train()


class Counter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import wasi_tool.nn.subspace as subspace
        import wasi_tool.ops.tucker as tucker

        self.calls: dict[str, int] = {}
        for module, name in [
            (tucker, "subspace_step"), (tucker, "orth"), (subspace, "subspace_step"),
            (subspace, "tucker_compress"), (torch.linalg, "qr"), (torch.linalg, "eigh"),
            (torch.linalg, "svd"), (torch.linalg, "cholesky_ex"),
        ]:  # fmt: skip
            monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return counted

    def reset(self) -> None:
        self.calls.clear()


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    x, y = _batch(seed)
    train_step(model, opt, x, y)


@pytest.mark.parametrize(("fixed", "plain"), [("asi-fixed", "asi"), ("wasi-fixed", "wasi")])
def test_no_decomposition_after_calibration(
    fixed: str, plain: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted: subspace iterations, ASI compressions, eigh and SVD calls; for asi-fixed also
    every QR (orth, Householder, Cholesky). wasi-fixed's WSI weight update orthonormalises its
    factor every step (that is the weight's update, not the activation's subspace)."""
    counter = Counter(monkeypatch)
    watched = {"subspace_step", "tucker_compress", "eigh", "svd"}
    if fixed == "asi-fixed":
        watched |= {"orth", "qr", "cholesky_ex"}
    for method in (fixed, plain):
        model = _prepared(method, (3, 2, 4))
        opt = SubspaceSGD(model, 0.05)
        counter.reset()
        _step(model, opt, 1)  # the fixed variant's calibration: one HOSVD per layer
        first = dict(counter.calls)
        counter.reset()
        for seed in (2, 3, 4):
            _step(model, opt, seed)
        later = {k: v for k, v in counter.calls.items() if k in watched}
        if method == fixed:
            assert first.get("eigh") == 2 * len(TARGETS)  # modes N and C of each target
            assert later == {}, later
            for name in TARGETS:
                act = model.get_submodule(name).act
                assert isinstance(act, FixedActivationBases) and act.calibrations == 1
        else:  # the per-step ASI iterates every step: the counter does see it
            assert later.get("subspace_step", 0) >= 3 * len(TARGETS)


def test_at_full_rank_asi_fixed_equals_vanilla() -> None:
    full = (6, 5, 16)  # >= every mode of both targets' inputs
    fixed, vanilla = _prepared("asi-fixed", full), _prepared("vanilla", full)
    for seed in (1, 2):  # calibration batch, then a later one projected on the fixed bases
        x, y = _batch(seed)
        grads = []
        for model in (fixed, vanilla):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        for name, g in grads[1].items():
            torch.testing.assert_close(grads[0][name], g, rtol=1e-4, atol=1e-6)


def test_at_full_rank_wasi_fixed_trains_as_wsi() -> None:
    full = (6, 5, 16)
    fixed, wsi = _prepared("wasi-fixed", full), _prepared("wsi", full)
    assert isinstance(fixed.get_submodule("block.fc1"), FixedWASILinear)
    opts = [SubspaceSGD(m, 0.05) for m in (fixed, wsi)]
    for seed in (1, 2, 3):
        for model, opt in zip((fixed, wsi), opts, strict=True):
            _step(model, opt, seed)
    for (name, a), (_, b) in zip(fixed.named_parameters(), wsi.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_saved_bytes_are_the_formula() -> None:
    ranks = (3, 2, 4)  # the batch rank 3 is not used: the batch mode stays whole
    model = _prepared("asi-fixed", ranks)
    x, y = _batch(1)
    opt = SubspaceSGD(model, 0.05)
    train_step(model, opt, x, y)  # calibration
    meter = SavedBytesMeter(model, TARGETS)
    result = train_step(model, opt, *_batch(2), meter=meter)
    b, n = x.shape[0], x.shape[1]
    per_layer = [b * 2 * 4 + n * 2 + c * 4 for c in (12, 16)]  # core + N r2 + I r3
    eye = b * b  # the batch mode's identity, one storage for every layer
    assert result.saved_targets == 4 * (sum(per_layer) + eye)
    from wasi_tool.training.accounting import layer_accounting

    shapes = {"block.fc1": (b, n, 12), "block.fc2": (b, n, 16)}
    rows = layer_accounting(model, TARGETS, get_method("asi-fixed"), shapes)
    assert [r["memory_elements"]["activation"] for r in rows] == [
        b * 2 * 4 + b * b + n * 2 + c * 4 for c in (12, 16)
    ]  # the Tucker count at ranks (B, 2, 4): its B^2 is the identity, shared


def test_recalibrates_when_the_ranks_change() -> None:
    model = _prepared("asi-fixed", (3, 2, 4))
    opt = SubspaceSGD(model, 0.05)
    _step(model, opt, 1)
    layer: Any = model.get_submodule("block.fc1")
    layer.act.ranks, layer.act.bases = (3, 3, 5), None  # what the memory plan does
    _step(model, opt, 2)
    assert layer.act.calibrations == 2 and layer.act.bases[2].shape == (12, 5)


def test_state_dict_carries_the_fixed_bases() -> None:
    model = _prepared("asi-fixed", (3, 2, 4))
    _step(model, SubspaceSGD(model, 0.05), 1)
    other = _prepared("asi-fixed", (3, 2, 4), seed=1)
    other.load_state_dict(copy.deepcopy(model.state_dict()))
    a, b = model.get_submodule("block.fc1").act, other.get_submodule("block.fc1").act
    assert isinstance(b, FixedActivationBases) and b.bases is not None
    torch.testing.assert_close(b.bases[1], a.bases[1])
    opt = SubspaceSGD(other, 0.05)
    _step(other, opt, 2)
    assert b.calibrations == 0  # resumed bases are used, not recomputed


def test_prepare_calibrates_on_the_first_batch() -> None:
    torch.manual_seed(0)
    model = Toy()
    model, opt = wasi_tool.prepare(model, "asi-fixed", TARGETS, verbose=False)
    layer: Any = model.get_submodule("block.fc1")
    assert isinstance(layer, FixedASILinear)
    x, y = _batch(1)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert isinstance(layer.act, FixedActivationBases) and layer.act.calibrations == 1
    assert model.wasi_prepared.act_ranks["block.fc1"]  # type: ignore[union-attr]


@pytest.mark.parametrize("method", ["asi-fixed", "wasi-fixed"])
def test_finetune_and_bench(method: str, tmp_path: Path) -> None:
    from wasi_tool.bench.train import TrainBenchConfig, measure
    from wasi_tool.models.loading import ModelSource
    from wasi_tool.stages.finetune import run_finetune

    src = ModelSource(arch="vit_tiny_patch16_224", img_size=32, random_init=True, seed=0)
    cfg = FinetuneConfig(method=method, targets="mlp", epochs=1, batch_size=8, max_steps=3)
    result = run_finetune(src, "digits", cfg, tmp_path / "ft")
    m = result.metrics
    assert m.final is not None and math.isfinite(m.final.train_loss)
    assert (m.measured.saved_bytes_per_step.targets or 0) > 0
    row = m.analytic["layers"][0]
    assert row["act_ranks"][0] == 8  # the batch mode whole
    bench = TrainBenchConfig(
        arch="vit_tiny_patch16_224", img_size=32, random_init=True, method=method,
        targets="mlp", batch_size=4, steps=2, warmup=1,
    )  # fmt: skip
    assert measure(bench).saved_bytes_targets > 0
