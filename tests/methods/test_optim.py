"""SubspaceSGD is a torch.optim.Optimizer: stock schedulers, clipping and state dicts work."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.methods import SubspaceSGD
from wasi_tool.methods.optim import NonFiniteGradient
from wasi_tool.nn import FactoredLinear, WASILinear


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def test_is_an_optimizer_and_equals_torch_sgd() -> None:
    a, b = _mlp(), _mlp()
    mine = SubspaceSGD(a, lr=0.1, momentum=0.9, weight_decay=1e-3)
    ref = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    assert isinstance(mine, torch.optim.Optimizer)
    x = torch.randn(5, 6)
    for _ in range(4):
        _step(a, mine, x)
        _step(b, ref, x)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_stock_scheduler_drives_both_groups() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(WASILinear.from_factored(FactoredLinear(6, 8, 3)), nn.Linear(8, 3))
    opt = SubspaceSGD(model, lr=0.2)
    assert [g["subspace"] for g in opt.param_groups] == [False, True]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seen: list[float] = []
    layer = model[0]
    real = layer.subspace_step

    def spy(lr: float, *args: float) -> None:
        seen.append(lr)
        real(lr, *args)

    layer.subspace_step = spy  # type: ignore[method-assign]
    model.train()
    x = torch.randn(4, 5, 6)
    for _ in range(3):
        _step(model, opt, x)
        sched.step()
    assert seen == pytest.approx([0.2, 0.1, 0.05])
    assert opt.lr == pytest.approx(0.025)


def test_state_dict_round_trip_resumes_momentum() -> None:
    a = _mlp()
    opt = SubspaceSGD(a, lr=0.1, momentum=0.9)
    x = torch.randn(5, 6)
    _step(a, opt, x)
    b = copy.deepcopy(a)
    opt_b = SubspaceSGD(b, lr=0.1, momentum=0.9)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))  # as through a checkpoint file
    _step(a, opt, x)
    _step(b, opt_b, x)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_non_finite_gradient_updates_nothing() -> None:
    model = _mlp()
    opt = SubspaceSGD(model, lr=0.1)
    before = copy.deepcopy(model.state_dict())
    opt.zero_grad()
    model(torch.full((2, 6), float("nan"))).sum().backward()
    with pytest.raises(NonFiniteGradient) as err:
        opt.step()
    assert isinstance(err.value, WasiToolError)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_wsi_rejects_momentum_and_empty_models() -> None:
    model = nn.Sequential(WASILinear.from_factored(FactoredLinear(6, 8, 3)))
    with pytest.raises(WasiToolError, match="momentum"):
        SubspaceSGD(model, lr=0.1, momentum=0.9)
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(WasiToolError, match="nothing to train"):
        SubspaceSGD(frozen, lr=0.1)
