"""gradcheck tests (float64) for the autograd Functions in ``wasi_tool.autograd.functions``.

What is checked, for a 3-D (B, N, I) and a 4-D (B, H, W, C) input, with and without a bias:

- ``WSIFunction`` / ``WASIFunction``: weight gradients go to a ``GradSink``, not to autograd, so
  ``torch.autograd.gradcheck`` covers only x and bias (L and R are held fixed). The sink is checked
  separately after one backward with a random dY: P (WSI, U is None) equals the dense
  dW = dY_flat^T x_flat; P U^T (WASI) equals dY_flat^T x_hat_flat, x_hat the Tucker reconstruction
  of the core and bases handed to the Function, and the dense dW when every Tucker rank is full.
- ``ASIFunction``: forward is F.linear(x, W, b) with dW taken from the compressed activation.
  With full Tucker ranks gradcheck on (x, W, b) passes; with truncated ranks gradcheck on (x, W, b)
  must fail (dW is not the true gradient), gradcheck on (x, b) passes, and dW equals
  dY_flat^T x_hat_flat.

The references (reconstruction, dW, dx, db) are dense computations written here with
``torch.tensordot`` / ``@``, independent of ``wasi_tool.ops``; only the core comes from
``tucker_core``. Each equality is paired with a check that a perturbed reference does not match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from wasi_tool.autograd.functions import ASIFunction, GradSink, WASIFunction, WSIFunction
from wasi_tool.ops.tucker import tucker_core

DTYPE = torch.float64
OUT, K = 5, 2
# (input shape, truncated Tucker ranks); every truncated rank is < its dimension.
CASES: list[tuple[tuple[int, ...], tuple[int, ...]]] = [
    ((2, 3, 4), (1, 2, 3)),
    ((2, 3, 3, 4), (1, 2, 2, 3)),
]
CASE_IDS = ["3d", "4d"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, gen: torch.Generator, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=DTYPE).requires_grad_(requires_grad)


def _bases(shape: Sequence[int], ranks: Sequence[int], gen: torch.Generator) -> list[torch.Tensor]:
    """Orthonormal D_m x r_m bases (thin QR of a Gaussian)."""
    return [torch.linalg.qr(_randn(d, r, gen=gen))[0] for d, r in zip(shape, ranks, strict=True)]


def _compress(
    x: torch.Tensor, ranks: Sequence[int], gen: torch.Generator
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    bases = _bases(x.shape, ranks, gen)
    with torch.no_grad():
        core = tucker_core(x.detach(), bases)
    assert core.shape == tuple(ranks)
    return core, bases


def _reconstruct(core: torch.Tensor, bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dense S x_1 U_1 x_2 U_2 ... via tensordot (independent of ``mode_product``)."""
    out = core
    for mode, u in enumerate(bases):
        out = torch.tensordot(u, out, dims=([1], [mode])).movedim(0, mode)
    return out


def _dense_dw(grad_out: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """dY_flat^T A_flat (O x I), flattening every leading dim."""
    return grad_out.reshape(-1, grad_out.shape[-1]).T @ act.reshape(-1, act.shape[-1])


def _assert_matches(got: torch.Tensor, ref: torch.Tensor) -> None:
    """assert_close, and a perturbed reference must not match (the check can fail)."""
    torch.testing.assert_close(got, ref)
    bumped = ref.clone()
    bumped.view(-1)[0] += 1e-3 * (1.0 + ref.abs().max())
    assert not torch.allclose(got, bumped)


def _gradcheck(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> None:
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def _factors(
    in_dim: int, gen: torch.Generator, requires_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    left = _randn(OUT, K, gen=gen, requires_grad=requires_grad)
    right = _randn(K, in_dim, gen=gen, requires_grad=requires_grad)
    return left, right


# --------------------------------------------------------------------------------------- WSI


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("shape", "ranks"), CASES, ids=CASE_IDS)
def test_wsi_gradcheck_x_and_bias(
    shape: tuple[int, ...], ranks: tuple[int, ...], with_bias: bool
) -> None:
    gen = _gen(0)
    x = _randn(*shape, gen=gen, requires_grad=True)
    left, right = _factors(shape[-1], gen, requires_grad=False)
    sink = GradSink()
    if with_bias:
        bias = _randn(OUT, gen=gen, requires_grad=True)
        _gradcheck(lambda x_, b_: WSIFunction.apply(x_, left, right, b_, sink), (x, bias))
    else:
        _gradcheck(lambda x_: WSIFunction.apply(x_, left, right, None, sink), (x,))
    assert sink.p is None  # L, R need no grad: nothing may reach the sink


@pytest.mark.parametrize(("shape", "ranks"), CASES, ids=CASE_IDS)
def test_wsi_sink_gets_dense_weight_grad(shape: tuple[int, ...], ranks: tuple[int, ...]) -> None:
    gen = _gen(1)
    x = _randn(*shape, gen=gen, requires_grad=True)
    left, right = _factors(shape[-1], gen, requires_grad=True)
    bias = _randn(OUT, gen=gen, requires_grad=True)
    sink = GradSink()
    y = WSIFunction.apply(x, left, right, bias, sink)
    torch.testing.assert_close(y, x.detach() @ (left @ right).detach().T + bias.detach())
    grad_out = _randn(*y.shape, gen=gen)
    y.backward(grad_out)

    assert sink.u is None and sink.p is not None
    _assert_matches(sink.p, _dense_dw(grad_out, x.detach()))
    assert left.grad is None and right.grad is None  # weight grads are not returned to autograd
    _assert_matches(x.grad, grad_out @ (left @ right).detach())
    _assert_matches(bias.grad, grad_out.reshape(-1, OUT).sum(0))


# -------------------------------------------------------------------------------------- WASI


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("shape", "ranks"), CASES, ids=CASE_IDS)
def test_wasi_gradcheck_x_and_bias(
    shape: tuple[int, ...], ranks: tuple[int, ...], with_bias: bool
) -> None:
    gen = _gen(2)
    x = _randn(*shape, gen=gen, requires_grad=True)
    left, right = _factors(shape[-1], gen, requires_grad=False)
    core, bases = _compress(x, ranks, gen)
    sink = GradSink()
    if with_bias:
        bias = _randn(OUT, gen=gen, requires_grad=True)
        _gradcheck(
            lambda x_, b_: WASIFunction.apply(x_, left, right, b_, sink, core, *bases), (x, bias)
        )
    else:
        _gradcheck(lambda x_: WASIFunction.apply(x_, left, right, None, sink, core, *bases), (x,))
    assert sink.p is None


@pytest.mark.parametrize("full", [False, True], ids=["truncated", "full"])
@pytest.mark.parametrize(("shape", "ranks"), CASES, ids=CASE_IDS)
def test_wasi_sink_gets_compressed_weight_grad(
    shape: tuple[int, ...], ranks: tuple[int, ...], full: bool
) -> None:
    gen = _gen(3)
    x = _randn(*shape, gen=gen, requires_grad=True)
    left, right = _factors(shape[-1], gen, requires_grad=True)
    bias = _randn(OUT, gen=gen, requires_grad=True)
    core, bases = _compress(x, shape if full else ranks, gen)
    sink = GradSink()
    y = WASIFunction.apply(x, left, right, bias, sink, core, *bases)
    torch.testing.assert_close(y, x.detach() @ (left @ right).detach().T + bias.detach())
    grad_out = _randn(*y.shape, gen=gen)
    y.backward(grad_out)

    assert sink.p is not None and sink.u is not None
    assert sink.p.shape == (OUT, core.shape[-1]) and sink.u.shape == (shape[-1], core.shape[-1])
    got = sink.p @ sink.u.T
    x_hat = _reconstruct(core, bases)
    _assert_matches(got, _dense_dw(grad_out, x_hat))
    dense = _dense_dw(grad_out, x.detach())
    if full:
        torch.testing.assert_close(x_hat, x.detach())
        _assert_matches(got, dense)
    else:  # truncation really changes the gradient, so the x_hat check above is not vacuous
        assert not torch.allclose(got, dense)
    assert left.grad is None and right.grad is None
    _assert_matches(x.grad, grad_out @ (left @ right).detach())
    _assert_matches(bias.grad, grad_out.reshape(-1, OUT).sum(0))


# --------------------------------------------------------------------------------------- ASI


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("shape", "ranks"), CASES, ids=CASE_IDS)
def test_asi_gradcheck_full_ranks(
    shape: tuple[int, ...], ranks: tuple[int, ...], with_bias: bool
) -> None:
    gen = _gen(4)
    x = _randn(*shape, gen=gen, requires_grad=True)
    weight = _randn(OUT, shape[-1], gen=gen, requires_grad=True)
    core, bases = _compress(x, shape, gen)
    if with_bias:
        bias = _randn(OUT, gen=gen, requires_grad=True)
        _gradcheck(
            lambda x_, w_, b_: ASIFunction.apply(x_, w_, b_, core, *bases), (x, weight, bias)
        )
    else:
        _gradcheck(lambda x_, w_: ASIFunction.apply(x_, w_, None, core, *bases), (x, weight))


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("shape", "ranks"), CASES, ids=CASE_IDS)
def test_asi_truncated_ranks(
    shape: tuple[int, ...], ranks: tuple[int, ...], with_bias: bool
) -> None:
    gen = _gen(5)
    x = _randn(*shape, gen=gen, requires_grad=True)
    weight = _randn(OUT, shape[-1], gen=gen, requires_grad=True)
    bias = _randn(OUT, gen=gen, requires_grad=True) if with_bias else None
    core, bases = _compress(x, ranks, gen)

    # The weight gradient is not the true one: gradcheck on W must notice.
    assert not torch.autograd.gradcheck(
        lambda w_: ASIFunction.apply(x.detach(), w_, bias, core, *bases),
        (weight,),
        eps=1e-6,
        atol=1e-6,
        raise_exception=False,
    )

    # x and b are exact whatever the ranks (W held fixed).
    w_fixed = weight.detach()
    if bias is not None:
        _gradcheck(lambda x_, b_: ASIFunction.apply(x_, w_fixed, b_, core, *bases), (x, bias))
    else:
        _gradcheck(lambda x_: ASIFunction.apply(x_, w_fixed, None, core, *bases), (x,))

    # dW is dY^T x_hat, x_hat the reconstruction of the core and bases given to the Function.
    y = ASIFunction.apply(x, weight, bias, core, *bases)
    ref_y = x.detach() @ w_fixed.T + (0.0 if bias is None else bias.detach())
    torch.testing.assert_close(y, ref_y)
    grad_out = _randn(*y.shape, gen=gen)
    y.backward(grad_out)
    _assert_matches(weight.grad, _dense_dw(grad_out, _reconstruct(core, bases)))
    assert not torch.allclose(weight.grad, _dense_dw(grad_out, x.detach()))
    _assert_matches(x.grad, grad_out @ w_fixed)
    if bias is not None:
        _assert_matches(bias.grad, grad_out.reshape(-1, OUT).sum(0))
