"""wasi_tool.prepare: full-rank updates equal torch.optim.SGD; schedulers, clipping, targets."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wasi_tool
from wasi_tool.errors import WasiToolError
from wasi_tool.nn.factored import FactoredLinear
from wasi_tool.nn.subspace import WASILinear

from .models import TinyViT

# the plain SGD these tests compare with: prepare's defaults are finetune's recipe (weight decay
# 1e-4, clip 2.0), so they are turned off here
PLAIN = {"weight_decay": 0.0, "clip": None, "verbose": False}


def _data(seed: int = 0, batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 16, 16, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 5, (batch,), generator=gen)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return TinyViT().double()


def _dense_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight as a dense tensor (factored layers multiplied out)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (FactoredLinear, WASILinear)):
            out[f"{name}.weight"] = (m.L @ m.R).detach()
            out[f"{name}.bias"] = m.bias.detach().clone()
    for name, p in model.named_parameters():
        if not (name.endswith(".L") or name.endswith(".R")) and name not in out:
            out[name] = p.detach().clone()
    return out


def _sgd_reference(steps: int, clip: float | None = None, lr: float = 0.05) -> nn.Module:
    model = _model().train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for k in range(steps):
        x, y = _data(k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model


@pytest.mark.parametrize("method", ["vanilla", "asi", "wsi", "wasi"])
def test_full_rank_prepare_equals_sgd(method: str) -> None:
    """eps 1: full-rank factors and activations; three steps match torch.optim.SGD."""
    ref = _sgd_reference(3)
    model, opt = wasi_tool.prepare(
        _model(), method, "mlp", eps=1.0, lr=0.05, example_input=_data(99)[0], **PLAIN
    )
    assert isinstance(opt, torch.optim.Optimizer)
    if method in ("wsi", "wasi"):
        assert sum(isinstance(m, WASILinear) for m in model.modules()) == 4
    model.train()
    for k in range(3):
        x, y = _data(k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    got, want = _dense_weights(model), _dense_weights(ref)
    assert set(got) == set(want)
    # asi/wasi: activation ranks are fixed by eps 1 on one batch, where linear1's input (a
    # LayerNorm output, zero mean) has rank C - 1; once the norm's bias moves it leaves that
    # subspace by ~1e-7. Dense gradients and the factored weights are exact (1e-9).
    atol = 1e-5 if method in ("asi", "wasi") else 1e-9
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-7, atol=atol, msg=name)


def test_clip_argument_is_the_global_clip_of_sgd_plus_clip_grad_norm() -> None:
    """wasi's clip= counts the WSI gradient factors: equal to clip_grad_norm_ on the dense
    model (the clip is small enough to bite)."""
    ref = _sgd_reference(2, clip=0.05)
    model, opt = wasi_tool.prepare(
        _model(), "wasi", "mlp", eps=1.0, clip=0.05, example_input=_data(99)[0], weight_decay=0.0
    )
    model.train()
    for k in range(2):
        x, y = _data(k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.last_clip_coef < 1.0
    got, want = _dense_weights(model), _dense_weights(ref)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-7, atol=1e-5, msg=name)


def test_stock_clip_grad_norm_works_for_methods_with_dense_gradients() -> None:
    ref = _sgd_reference(2, clip=0.05)
    model, opt = wasi_tool.prepare(_model(), "vanilla", "mlp", **PLAIN)
    model.train()
    for k in range(2):
        x, y = _data(k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
    got, want = _dense_weights(model), _dense_weights(ref)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


def test_stock_scheduler_drives_both_groups_and_the_wsi_step() -> None:
    model, opt = wasi_tool.prepare(
        _model(), "wasi", "mlp", lr=0.1, example_input=_data(9)[0], verbose=False
    )
    assert len(opt.param_groups) == 2  # ordinary parameters, WSI factors
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 1.0)
    model.train()
    x, y = _data(0)
    moved = []
    for _ in range(2):
        before = _dense_weights(model)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        after = _dense_weights(model)
        moved.append({n: float((after[n] - before[n]).abs().max()) for n in after})
    weight = "encoder.layers.0.linear1.weight"  # L R of a WSI layer
    assert moved[0][weight] > 1e-4 and moved[0]["head.weight"] > 1e-4  # lr 0.1: both moved
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    # lr 0 from the scheduler: nothing moves (the factors may rotate; L R stays)
    assert max(moved[1].values()) < 1e-12


def test_targets_by_type_glob_list_and_preset() -> None:
    from wasi_tool.api import resolve_targets

    model = _model()
    mlp = [f"encoder.layers.{i}.linear{j}" for i in range(2) for j in (1, 2)]
    assert resolve_targets(model, "mlp") == mlp
    assert resolve_targets(model, "*linear1") == mlp[::2]
    assert resolve_targets(model, ["encoder.layers.0.linear1", "*.1.linear2"]) == [
        mlp[0],
        mlp[3],
    ]
    # by type: every nn.Linear but the head and MultiheadAttention's out_proj
    assert resolve_targets(model, nn.Linear) == mlp
    assert resolve_targets(model, "all", exclude=["*linear2"]) == mlp[::2]
    with pytest.raises(WasiToolError, match="MultiheadAttention"):
        resolve_targets(model, "*out_proj")
    with pytest.raises(WasiToolError, match="no linear layer"):
        resolve_targets(model, "*nothing*")


def test_activation_ranks_from_the_first_training_batch_equal_an_example_batch(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """No example batch: the ranks are chosen on the first training forward, and the run is
    the one a user gets by passing that batch as ``example_input`` (ranks, then weights)."""
    batches = [_data(k) for k in (3, 4)]
    with caplog.at_level(logging.INFO, logger="wasi_tool"):
        lazy, lazy_opt = wasi_tool.prepare(_model(), "wasi", "mlp", **{**PLAIN, "verbose": True})
    assert lazy.wasi_prepared.act_ranks == {}
    eager, eager_opt = wasi_tool.prepare(
        _model(), "wasi", "mlp", example_input=batches[0][0], **PLAIN
    )
    for model, opt in ((lazy, lazy_opt), (eager, eager_opt)):
        model.train()
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert lazy.wasi_prepared.act_ranks == eager.wasi_prepared.act_ranks
    assert len(lazy.wasi_prepared.act_ranks) == 4
    got, want = _dense_weights(lazy), _dense_weights(eager)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
    said = [r.getMessage() for r in caplog.records if "first training batch" in r.getMessage()]
    assert len([m for m in said if "calibrated" in m]) == 1  # said once, when it happened
    assert capsys.readouterr().out == ""  # the library never prints
    model, _ = wasi_tool.prepare(_model(), "asi", "mlp", act_ranks=(2, 4, 8), verbose=False)
    assert set(model.wasi_prepared.act_ranks.values()) == {(2, 4, 8)}


def test_lora_prepares_and_trains_adapters_only() -> None:
    model, opt = wasi_tool.prepare(_model(), "lora", "mlp", lora_rank=2, verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and not any(
        n.endswith("linear1.base_layer.weight") for n in trainable
    )
    x, y = _data(0)
    frozen = copy.deepcopy(model.encoder.layers[0].linear1.base_layer.weight)
    opt.zero_grad()
    F.cross_entropy(model.train()(x), y).backward()
    opt.step()
    assert torch.equal(frozen, model.encoder.layers[0].linear1.base_layer.weight)


def test_calibrated_factoring_keeps_the_outputs_on_the_example_better() -> None:
    """calibrate=True truncates each dense target in the metric of its inputs on the example:
    on those inputs its output error is at most plain SVD's at the same eps (per layer)."""
    x = _data(5, batch=16)[0]
    dense = _model()
    name = "encoder.layers.0.linear1"
    inputs = {}

    def keep(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs.setdefault("x", args[0].detach().flatten(0, 1))

    hook = dense.get_submodule(name).register_forward_pre_hook(keep)
    with torch.no_grad():
        dense.train()(x)  # train mode: the fused eval kernel would not call linear1 (no dropout)
    hook.remove()
    w = dense.get_submodule(name).weight.detach()
    errors = {}
    for calibrate in (False, True):
        model, _ = wasi_tool.prepare(
            copy.deepcopy(dense), "wsi", "mlp", eps=0.5, example_input=x, calibrate=calibrate,
            verbose=False,
        )  # fmt: skip
        layer = model.get_submodule(name)
        approx = (layer.L @ layer.R).detach()
        errors[calibrate] = float(torch.linalg.norm(inputs["x"] @ (w - approx).T))
    assert errors[True] <= errors[False] * (1 + 1e-9)
    with pytest.raises(WasiToolError, match="example_input"):
        wasi_tool.prepare(_model(), "wsi", "mlp", calibrate=True, verbose=False)
