"""Whitened truncation (method.md section 8) against dense references, and budgeted ranks."""

from __future__ import annotations

import math

import pytest
import torch

from wasi_tool.errors import WasiToolError
from wasi_tool.ops import (
    allocate_ranks,
    check_budget,
    dropped_energy,
    relative_output_error,
    spectrum,
    truncate,
    whitened_svd,
    whitening,
)
from wasi_tool.ops.whiten import output_error, whitened_factored_spectrum, whitened_truncate


def _anisotropic_inputs(n: int, i: int, seed: int = 0) -> torch.Tensor:
    """n x I rows with a steeply decaying, rotated covariance (as real activations have); the
    covariance is the same for every ``seed``, the samples differ."""
    q, _ = torch.linalg.qr(
        torch.randn(i, i, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    )
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2.5, i, dtype=torch.float64)
    return (torch.randn(n, i, generator=gen, dtype=torch.float64) * scales) @ q.T


def _weight(o: int, i: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(o, i, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _sqrtm(c: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a positive definite C, by an independent route (SVD)."""
    u, s, _ = torch.linalg.svd(c)
    return u @ torch.diag(s.sqrt()) @ u.T


def test_full_rank_returns_w_exactly() -> None:
    x = _anisotropic_inputs(200, 12)
    for o in (7, 12, 20):  # wide, square and tall
        w = _weight(o, 12)
        f = whitened_svd(w.float(), (x.T @ x).float(), rank=min(o, 12))
        assert f.left.dtype == torch.float32
        torch.testing.assert_close(f.left @ f.right, w.float(), rtol=1e-4, atol=1e-5)
        f64 = whitened_svd(w, x.T @ x, eps=1.0)
        assert f64.rank == min(o, 12)
        torch.testing.assert_close(f64.left @ f64.right, w, rtol=1e-9, atol=1e-10)


def test_full_rank_with_a_rank_deficient_gram_returns_w() -> None:
    """Fewer rows than inputs: C is singular, the damping keeps S invertible."""
    x = _anisotropic_inputs(5, 16)
    w = _weight(10, 16)
    f = whitened_svd(w, x.T @ x, rank=10)
    torch.testing.assert_close(f.left @ f.right, w, rtol=1e-7, atol=1e-8)
    # with no damping the pseudo-inverse keeps what the data sees: X (W - LR)^T = 0
    f0 = whitened_svd(w, x.T @ x, rank=5, damp=0.0)
    torch.testing.assert_close(x @ (f0.left @ f0.right).T, x @ w.T, rtol=1e-7, atol=1e-8)


def test_rank_k_is_the_best_in_the_calibration_metric() -> None:
    x = _anisotropic_inputs(300, 16)
    c = x.T @ x
    w = _weight(10, 16)
    k = 4
    f = whitened_svd(w, c, rank=k, damp=0.0)
    approx = f.left @ f.right
    torch.testing.assert_close(f.left.T @ f.left, torch.eye(k, dtype=torch.float64))
    err = torch.linalg.matrix_norm(x @ (w - approx).T).item()
    # the closed form through an independently computed sqrt(C) (Eckart-Young in that metric)
    root = _sqrtm(c)
    u, s, vh = torch.linalg.svd(w @ root)
    reference = (u[:, :k] * s[:k]) @ vh[:k] @ torch.linalg.inv(root)
    torch.testing.assert_close(approx, reference, rtol=1e-6, atol=1e-8)
    # the error is the tail of the whitened spectrum, and the output error from C agrees
    assert math.isclose(err, f.error(), rel_tol=1e-8)
    assert math.isclose(err, math.sqrt(float((s[k:] ** 2).sum())), rel_tol=1e-8)
    assert math.isclose(output_error(w - approx, c), err, rel_tol=1e-8)
    # no rank-K perturbation of the optimum does better; plain SVD does worse
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        dl = 1e-2 * torch.randn(10, k, generator=gen, dtype=torch.float64)
        dr = 1e-2 * torch.randn(k, 16, generator=gen, dtype=torch.float64)
        other = (f.left + dl) @ (f.right + dr)
        assert torch.linalg.matrix_norm(x @ (w - other).T).item() >= err
    lp, rp = truncate(spectrum(w), k, torch.float64)
    assert torch.linalg.matrix_norm(x @ (w - lp @ rp).T).item() > 1.5 * err


def test_eps_applies_to_the_whitened_spectrum() -> None:
    x = _anisotropic_inputs(300, 16)
    w = _weight(10, 16)
    f = whitened_svd(w, x.T @ x, eps=0.9)
    energy = (f.s**2).cumsum(0) / (f.s**2).sum()
    assert energy[f.rank - 1] >= 0.9 and (f.rank == 1 or energy[f.rank - 2] < 0.9)
    # the kept output energy on the calibration data is what eps asked for
    err = relative_output_error(w, f.left @ f.right, x.T @ x)
    assert err**2 <= 0.1 + 1e-3


def test_factored_input_matches_dense() -> None:
    x = _anisotropic_inputs(300, 16)
    w = _weight(10, 16)
    lp, rp = truncate(spectrum(w), 8, torch.float64)  # an already factored rank-8 layer
    white = whitening(x.T @ x)
    spec = whitened_factored_spectrum(lp, rp, white)
    left, right = whitened_truncate(spec, white, 3, torch.float64)
    ref = whitened_svd(lp @ rp, x.T @ x, rank=3)
    torch.testing.assert_close(left @ right, ref.left @ ref.right, rtol=1e-7, atol=1e-9)


def test_bad_grams_are_errors() -> None:
    w = _weight(4, 6)
    with pytest.raises(WasiToolError, match="zero"):
        whitened_svd(w, torch.zeros(6, 6), rank=2)
    with pytest.raises(WasiToolError, match="I x I"):
        whitened_svd(w, torch.eye(5), rank=2)
    with pytest.raises(WasiToolError, match="damping"):
        whitening(torch.eye(3), damp=-1.0)


def test_calibrated_error_is_below_plain_on_held_out_anisotropic_inputs() -> None:
    calib = _anisotropic_inputs(400, 32, seed=0)
    held = _anisotropic_inputs(400, 32, seed=5)  # same distribution, other samples
    w = _weight(24, 32)
    k = 6
    f = whitened_svd(w, calib.T @ calib, rank=k)
    lp, rp = truncate(spectrum(w), k, torch.float64)
    c_h = held.T @ held
    calibrated = relative_output_error(w, f.left @ f.right, c_h)
    plain = relative_output_error(w, lp @ rp, c_h)
    assert calibrated < 0.5 * plain


# budgeted ranks


def test_budget_is_met_and_never_exceeded() -> None:
    gen = torch.Generator().manual_seed(0)
    values = {
        f"l{n}": torch.linalg.svdvals(torch.randn(o, i, generator=gen))
        for n, (o, i) in enumerate([(30, 10), (12, 40), (25, 25)])
    }
    costs = {"l0": 40, "l1": 52, "l2": 50}
    for budget in (142, 500, 777, 1234):
        ranks = allocate_ranks(values, costs, budget)
        spent = sum(ranks[n] * costs[n] for n in ranks)
        assert spent <= budget
        # maximal: no layer below its cap can take one more rank
        for n in ranks:
            assert ranks[n] == values[n].numel() or spent + costs[n] > budget
    with pytest.raises(WasiToolError, match="below rank 1"):
        allocate_ranks(values, costs, 141)
    capped = allocate_ranks(values, costs, 10_000, caps={"l0": 3})
    assert capped == {"l0": 3, "l1": 12, "l2": 25}


def test_budget_beats_uniform_ranks() -> None:
    """One layer with a fast-decaying spectrum, one flat: the same fraction of each layer's
    rank (uniform) wastes parameters on the first."""
    fast = torch.logspace(0, -6, 32, dtype=torch.float64) * 10
    flat = torch.linspace(1.0, 0.8, 32, dtype=torch.float64)
    values = {"fast": fast, "flat": flat}
    costs = {"fast": 64, "flat": 64}
    uniform = {"fast": 12, "flat": 12}
    budget = sum(uniform[n] * costs[n] for n in uniform)
    ranks = allocate_ranks(values, costs, budget)
    assert sum(ranks[n] * costs[n] for n in ranks) == budget
    assert ranks["flat"] > ranks["fast"]
    assert dropped_energy(values, ranks) < 0.8 * dropped_energy(values, uniform)
    # and it is the optimum of this separable problem: no split of the same total does better
    best = min(dropped_energy(values, {"fast": a, "flat": 24 - a}) for a in range(1, 24))
    assert math.isclose(dropped_energy(values, ranks), best)


def test_check_budget() -> None:
    assert check_budget(0.4) == 0.4
    for bad in (0.0, -0.1, 1.5, float("nan"), "x"):
        with pytest.raises(WasiToolError, match="rank_budget"):
            check_budget(bad)  # type: ignore[arg-type]
