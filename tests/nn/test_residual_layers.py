"""ASI / WASI layers with sampled residual rows (``act_residual_rows``, method.md section 9).

- m = 0 is today's layer, bit for bit (outputs, dA, db, dW or the WSI update, state dict).
- m > 0: dA and db are unchanged (only the weight gradient is estimated); the weight gradient
  is an unbiased estimate of the exact dY^T x: its mean over 1000 steps on one input, each with
  a fresh subspace step and a fresh draw, is within 5 standard errors of the exact dW on every
  entry (deterministic: fixed seeds); plain ASI fails that test.
- runs are reproducible from the layer's seed; a state dict resumes the sampler.
- the extra bytes autograd saves, counted by SavedBytesMeter, equal the formula
  m I element_size + 8 m.
- in a recompute region the replay uses the recorded draw: gradients equal the plain run's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wasi_tool.measure import SavedBytesMeter
from wasi_tool.methods import LayerOptions, prepare_
from wasi_tool.methods.optim import SubspaceSGD
from wasi_tool.nn import ASILinear, FactoredLinear, WASILinear
from wasi_tool.nn.recompute import recompute_
from wasi_tool.ops.residual import residual_saved_bytes

X_SHAPE, RANKS, OUT = (4, 6, 12), (2, 3, 4), 10


def _asi(m: int, seed: int = 3, dtype: torch.dtype = torch.float64) -> ASILinear:
    torch.manual_seed(0)
    ref = nn.Linear(X_SHAPE[-1], OUT).to(dtype)
    return ASILinear.from_linear(ref, RANKS, seed=seed, act_residual_rows=m).train()


def _wasi(m: int, seed: int = 3, dtype: torch.dtype = torch.float64) -> WASILinear:
    torch.manual_seed(0)
    fact = FactoredLinear.from_linear(nn.Linear(X_SHAPE[-1], OUT), 5).to(dtype)
    return WASILinear.from_factored(fact, RANKS, seed=seed, act_residual_rows=m).train()


def _inputs(step: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(*X_SHAPE, generator=gen, dtype=dtype) + 2.0
    return x.requires_grad_(), torch.randn(*X_SHAPE[:-1], OUT, generator=gen, dtype=dtype)


def _asi_grads(layer: ASILinear, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = layer(x)
    y.backward(dy)
    assert layer.weight.grad is not None and layer.bias is not None and x.grad is not None
    assert layer.bias.grad is not None
    return [y.detach(), x.grad, layer.weight.grad, layer.bias.grad]


def test_zero_rows_is_todays_asi_bit_for_bit() -> None:
    today = _asi(0)
    torch.manual_seed(0)
    default = ASILinear.from_linear(nn.Linear(X_SHAPE[-1], OUT).double(), RANKS, seed=3).train()
    for step in range(3):
        x, dy = _inputs(step)
        for a, b in zip(_asi_grads(today, x, dy), _asi_grads(default, x, dy), strict=True):
            assert torch.equal(a, b)
    assert set(today.state_dict()["_extra_state"]) == {"ranks", "bases", "generator"}
    assert "act_residual_rows" not in repr(today)


def test_zero_rows_is_todays_wasi_bit_for_bit() -> None:
    torch.manual_seed(0)
    fact = FactoredLinear.from_linear(nn.Linear(X_SHAPE[-1], OUT), 5).double()
    layers = [_wasi(0), WASILinear.from_factored(fact, RANKS, seed=3).train()]
    opts = [SubspaceSGD(layer, lr=0.05, weight_decay=1e-2, clip=0.5) for layer in layers]
    for step in range(3):
        x, dy = _inputs(step)
        grads = []
        for layer, opt in zip(layers, opts, strict=True):
            opt.zero_grad()
            xi = x.detach().requires_grad_()
            layer(xi).backward(dy)
            grads.append((xi.grad, layer.grad_sq_norm()))
            opt.step()
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
        assert torch.equal(layers[0].L, layers[1].L) and torch.equal(layers[0].R, layers[1].R)


def test_layer_options_default_builds_todays_layer() -> None:
    assert LayerOptions(RANKS).act_residual_rows == 0
    for method, m in (("asi", 0), ("asi", 3), ("wasi", 0), ("wasi", 3)):
        model = nn.Sequential(nn.Linear(X_SHAPE[-1], OUT))
        if method == "wasi":
            model[0] = FactoredLinear.from_linear(model[0], 5)
        prepare_(model, method, ["0"], {"0": LayerOptions(RANKS, seed=4, act_residual_rows=m)})
        act = model[0].act
        assert act is not None and act.residual_rows == m and act.seed == 4


@pytest.mark.parametrize("kind", ["asi", "wasi"])
def test_input_and_bias_grads_are_unchanged(kind: str) -> None:
    """Only the weight gradient is estimated: y, dA and db equal plain ASI's exactly."""
    plain, unbiased = (_asi(0), _asi(5)) if kind == "asi" else (_wasi(0), _wasi(5))
    for step in range(2):
        x, dy = _inputs(step)
        outs = []
        for layer in (plain, unbiased):
            xi = x.detach().requires_grad_()
            layer.zero_grad(set_to_none=True)
            y = layer(xi)
            y.backward(dy)
            assert layer.bias is not None and layer.bias.grad is not None
            outs.append((y.detach(), xi.grad, layer.bias.grad.clone()))
            if isinstance(layer, WASILinear):
                layer.sink.clear()
        for a, b in zip(*outs, strict=True):
            assert torch.equal(a, b)
    # the input gradient against autograd on the dense weight (gradcheck-style, float64)
    x, dy = _inputs(5)
    layer = _asi(5)
    xi = x.detach().requires_grad_()
    layer(xi).backward(dy)
    xr = x.detach().requires_grad_()
    torch.nn.functional.linear(xr, layer.weight.detach(), layer.bias).backward(dy)
    torch.testing.assert_close(xi.grad, xr.grad)


def _dw_draws(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, n: int) -> torch.Tensor:
    draws = []
    for _ in range(n):
        xi = x.detach().requires_grad_()
        if isinstance(layer, ASILinear):
            layer.weight.grad = None
            layer(xi).backward(dy)
            assert layer.weight.grad is not None
            draws.append(layer.weight.grad.clone())
        else:
            assert isinstance(layer, WASILinear)
            layer(xi).backward(dy)
            p, u = layer.sink.p, layer.sink.u
            assert p is not None and u is not None
            draws.append(p @ u.T)
            # ||G||^2 from the (non-orthonormal) factors is the dense norm
            torch.testing.assert_close(layer.grad_sq_norm(), (p @ u.T).pow(2).sum())
            layer.sink.clear()
    return torch.stack(draws)


@pytest.mark.parametrize("kind", ["asi", "wasi"])
def test_weight_grad_is_unbiased_over_steps(kind: str) -> None:
    n = 1000
    x, dy = _inputs(0)
    exact = dy.reshape(-1, OUT).T @ x.detach().reshape(-1, X_SHAPE[-1])
    layer = _asi(4) if kind == "asi" else _wasi(4)
    draws = _dw_draws(layer, x, dy, n)
    se = draws.std(0) / n**0.5
    assert bool((se > 0).all())
    z = (draws.mean(0) - exact).abs() / se
    assert float(z.max()) < 5.0
    plain = _dw_draws(_asi(0) if kind == "asi" else _wasi(0), x, dy, 3)[-1]
    assert float(((plain - exact).abs() / se).max()) > 10.0  # plain ASI fails the same test


def test_draws_are_reproducible_from_the_seed() -> None:
    x, dy = _inputs(0)
    a, b, c = _asi(3, seed=7), _asi(3, seed=7), _asi(3, seed=8)
    for _ in range(2):
        ga, gb, gc = (_asi_grads(layer, x, dy)[2] for layer in (a, b, c))
        assert torch.equal(ga, gb)
        assert not torch.equal(ga, gc)


def test_state_dict_resumes_the_sampler() -> None:
    layer = _asi(3, seed=7)
    for step in range(2):
        _asi_grads(layer, *_inputs(step))
    state = layer.state_dict()
    assert "residual_generator" in state["_extra_state"]
    twin = _asi(3, seed=99)
    twin.load_state_dict(state)
    x, dy = _inputs(2)
    assert torch.equal(_asi_grads(layer, x, dy)[2], _asi_grads(twin, x, dy)[2])


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="needs act_ranks"):
        WASILinear(12, 10, 4, act_ranks=None, act_residual_rows=2)
    with pytest.raises(ValueError, match=">= 0"):
        ASILinear(12, 10, RANKS, act_residual_rows=-1)
    with pytest.raises(ValueError, match="sampling"):
        ASILinear(12, 10, RANKS, act_residual_rows=2, act_residual_sampling="topk")


@pytest.mark.parametrize("m", [1, 7, 40])
@pytest.mark.parametrize("kind", ["asi", "wasi"])
def test_extra_saved_bytes_equal_the_formula(kind: str, m: int) -> None:
    """Measured with SavedBytesMeter on an input that requires grad, fp32."""
    shape = (8, 10, 48)
    gen = torch.Generator().manual_seed(0)
    measured = []
    for rows in (0, m):
        torch.manual_seed(0)
        dense = nn.Linear(shape[-1], 32)
        layer: nn.Module
        if kind == "asi":
            layer = ASILinear.from_linear(dense, (3, 4, 6), act_residual_rows=rows)
        else:
            fact = FactoredLinear.from_linear(dense, 8)
            layer = WASILinear.from_factored(fact, (3, 4, 6), act_residual_rows=rows)
        layer.train()
        x = torch.randn(*shape, generator=gen, requires_grad=True)
        meter = SavedBytesMeter(layer)
        with meter:
            out = layer(x)
        out.sum().backward()
        measured.append(meter.total)
    assert measured[1] - measured[0] == residual_saved_bytes(m, shape[-1], 4)


def test_recompute_replays_the_recorded_draw() -> None:
    x, dy = _inputs(0)
    plain, region = _asi(4, seed=5), _asi(4, seed=5)
    recompute_(region)
    for _ in range(2):
        for a, b in zip(_asi_grads(plain, x, dy), _asi_grads(region, x, dy), strict=True):
            assert torch.equal(a, b)
    # what the region keeps is counted: its input plus the recorded compression and draw
    layer = _asi(4, seed=5, dtype=torch.float32)
    recompute_(layer)
    x32 = x.detach().float().requires_grad_()
    meter = SavedBytesMeter(layer)
    with meter:
        out = layer(x32)
    out.backward(dy.float())
    base = _asi(0, seed=5, dtype=torch.float32)
    recompute_(base)
    meter0 = SavedBytesMeter(base)
    with meter0:
        out = base(x32)
    out.backward(dy.float())
    assert meter.total - meter0.total == residual_saved_bytes(4, X_SHAPE[-1], 4)


def test_wasi_update_applies_the_stacked_residual_factors() -> None:
    """At full weight rank the WSI step is the dense SGD step with G = P U^T + Q V^T."""
    torch.manual_seed(0)
    fact = FactoredLinear.from_linear(nn.Linear(X_SHAPE[-1], OUT), OUT).double()
    layer = WASILinear.from_factored(fact, RANKS, seed=2, act_residual_rows=5).train()
    x, dy = _inputs(0)
    before = (layer.L @ layer.R).detach().clone()
    layer(x).backward(dy)
    assert layer.sink.p is not None and layer.sink.u is not None and not layer.sink.orthonormal
    assert layer.sink.p.shape[1] == RANKS[-1] + 5  # the Tucker factor and the 5 sampled rows
    grad = layer.sink.p @ layer.sink.u.T
    layer.subspace_step(lr=0.1, weight_decay=0.01)
    torch.testing.assert_close(layer.L @ layer.R, (1 - 0.1 * 0.01) * before - 0.1 * grad)
    assert layer.sink.p is None and layer.sink.orthonormal
