"""The unbiased weight-gradient estimate (``wasi_tool.ops.residual``, method.md section 9).

References are dense and independent of ``wasi_tool.ops``: the Tucker reconstruction by
``tensordot``, the residual D = A - A~ formed whole, the exact dW = dY_flat^T A_flat.

The statistical test: over n = 2000 draws (fixed seed, so the test is deterministic) the mean
of each entry of dW^ must be within 5 standard errors (std / sqrt(n), std measured over the
same draws) of the exact dW. By the central limit theorem each entry's z-score is close to a
standard normal, so for the 40 entries here P(max |z| > 5) is about 40 * 6e-7 = 2e-5 for an
unbiased estimator (measured: max z 1.0 to 2.5). Resolution: plain ASI (the residual term
left out) reaches z = 24 (m = 1) and 47 (m = 4), so the test catches a bias of about 20%
(m = 1) or 10% (m = 4) of the residual term dY^T D; a smaller error in the 1 / (m p_i)
scaling is caught by the exact check of the sampled rows against the dense residual. Plain
ASI and an estimate with half the residual term are checked to fail the same test.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from wasi_tool.ops.residual import (
    INDEX_BYTES,
    RESIDUAL_SAMPLINGS,
    residual_grad_factors,
    residual_row_norms,
    residual_saved_bytes,
    residual_weight_grad,
    sample_residual_rows,
    sampling_probabilities,
    tucker_rows,
)
from wasi_tool.ops.tucker import tucker_core

DTYPE = torch.float64
SHAPE, RANKS, OUT = (4, 6, 8), (2, 3, 3), 5
DRAWS, Z_MAX = 2000, 5.0


def _setup(
    seed: int = 0, ranks: Sequence[int] = RANKS, shape: Sequence[int] = SHAPE
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # a low-rank-ish activation plus noise, so the residual is neither zero nor everything
    x = torch.randn(*shape, generator=gen, dtype=DTYPE)
    x = x + 3.0 * torch.randn(shape[-1], generator=gen, dtype=DTYPE)
    bases = [
        torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=DTYPE))[0]
        for d, r in zip(shape, ranks, strict=True)
    ]
    core = tucker_core(x, bases)
    grad_out = torch.randn(*shape[:-1], OUT, generator=gen, dtype=DTYPE)
    return x, core, bases, grad_out


def _reconstruct(core: torch.Tensor, bases: Sequence[torch.Tensor]) -> torch.Tensor:
    out = core
    for mode, u in enumerate(bases):
        out = torch.tensordot(u, out, dims=([1], [mode])).movedim(0, mode)
    return out


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _draws(
    x: torch.Tensor,
    core: torch.Tensor,
    bases: list[torch.Tensor],
    grad_out: torch.Tensor,
    m: int,
    sampling: str,
    n: int = DRAWS,
    seed: int = 1,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """n draws of dW^ = dY^T A~ + residual term (stacked n x O x I), and the samples."""
    base = _flat(grad_out).T @ _flat(_reconstruct(core, bases))
    gen = torch.Generator().manual_seed(seed)
    out, samples = [], []
    for _ in range(n):
        rows, index = sample_residual_rows(x, core, bases, m, gen, sampling)
        samples.append((rows, index))
        out.append(base + residual_weight_grad(grad_out, rows, index))
    return torch.stack(out), samples


def _max_z(draws: torch.Tensor, exact: torch.Tensor) -> float:
    mean = draws.mean(0)
    se = draws.std(0) / draws.shape[0] ** 0.5
    assert bool((se > 0).all())  # every entry really varies: the residual is not zero
    return float(((mean - exact).abs() / se).max())


def test_row_norms_match_dense_residual() -> None:
    x, core, bases, _ = _setup()
    d = _flat(x - _reconstruct(core, bases))
    for chunk in (1, 5, 1024):  # several chunks, a ragged last one, a single one
        got = residual_row_norms(_flat(x), tucker_rows(core, bases), bases[-1], chunk)
        torch.testing.assert_close(got, torch.linalg.vector_norm(d, dim=1))
    with pytest.raises(ValueError, match="chunk"):
        residual_row_norms(_flat(x), tucker_rows(core, bases), bases[-1], 0)


@pytest.mark.parametrize("sampling", RESIDUAL_SAMPLINGS)
def test_sampled_rows_are_scaled_residual_rows(sampling: str) -> None:
    x, core, bases, grad_out = _setup(2)
    m = 7
    d = _flat(x - _reconstruct(core, bases))
    n = d.shape[0]
    p = torch.linalg.vector_norm(d, dim=1) if sampling == "norm" else torch.ones(n, dtype=DTYPE)
    p = p / p.sum()
    gen = torch.Generator().manual_seed(3)
    rows, index = sample_residual_rows(x, core, bases, m, gen, sampling)
    assert rows.shape == (m, SHAPE[-1]) and rows.dtype == DTYPE
    assert index.shape == (m,) and index.dtype == torch.int64
    torch.testing.assert_close(rows, d[index] / (m * p[index])[:, None])
    q, v = residual_grad_factors(grad_out, rows, index)
    ref = sum(torch.outer(_flat(grad_out)[i], d[i]) / (m * p[i]) for i in index.tolist())
    torch.testing.assert_close(q @ v.T, ref)
    torch.testing.assert_close(residual_weight_grad(grad_out, rows, index), ref)
    # the same generator state draws the same rows
    again = sample_residual_rows(x, core, bases, m, torch.Generator().manual_seed(3), sampling)
    assert torch.equal(again[0], rows) and torch.equal(again[1], index)


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("sampling", RESIDUAL_SAMPLINGS)
def test_mean_over_draws_is_exact_dw(sampling: str, m: int) -> None:
    x, core, bases, grad_out = _setup()
    exact = _flat(grad_out).T @ _flat(x)
    draws, samples = _draws(x, core, bases, grad_out, m, sampling)
    assert _max_z(draws, exact) < Z_MAX

    # Power: plain ASI's dW~ fails the same test by far, and so does an estimate that is off
    # by half the residual term (the same draws at half their weight).
    plain = _flat(grad_out).T @ _flat(_reconstruct(core, bases))
    se = draws.std(0) / DRAWS**0.5
    assert float(((plain - exact).abs() / se).max()) > 2 * Z_MAX
    half = torch.stack([plain + 0.5 * residual_weight_grad(grad_out, *s) for s in samples])
    assert _max_z(half, exact) > Z_MAX


@pytest.mark.parametrize("sampling", RESIDUAL_SAMPLINGS)
def test_variance_matches_formula(sampling: str) -> None:
    """E||dW^ - dW||^2 = (sum_i ||dY_i||^2 ||D_i||^2 / p_i - ||dY^T D||^2) / m."""
    x, core, bases, grad_out = _setup(4)
    m = 3
    exact = _flat(grad_out).T @ _flat(x)
    d = _flat(x - _reconstruct(core, bases))
    dy = _flat(grad_out)
    p = sampling_probabilities(torch.linalg.vector_norm(d, dim=1), sampling)
    term = (dy.pow(2).sum(1) * d.pow(2).sum(1) / p).sum()
    formula = float((term - (dy.T @ d).pow(2).sum()) / m)
    draws, _ = _draws(x, core, bases, grad_out, m, sampling)
    measured = float((draws - exact).pow(2).sum((1, 2)).mean())
    assert abs(measured / formula - 1) < 0.15  # 2000 draws of a heavy-ish tailed norm


def test_full_ranks_give_zero_residual() -> None:
    x, core, bases, grad_out = _setup(5, ranks=SHAPE)
    norms = residual_row_norms(_flat(x), tucker_rows(core, bases), bases[-1])
    assert float(norms.max()) < 1e-10
    exact = _flat(grad_out).T @ _flat(x)
    for sampling in RESIDUAL_SAMPLINGS:
        rows, index = sample_residual_rows(
            x, core, bases, 3, torch.Generator().manual_seed(0), sampling
        )
        assert bool(torch.isfinite(rows).all())
        est = _flat(grad_out).T @ _flat(_reconstruct(core, bases))
        torch.testing.assert_close(est + residual_weight_grad(grad_out, rows, index), exact)


def test_zero_norms_fall_back_to_uniform() -> None:
    p = sampling_probabilities(torch.zeros(4), "norm")
    torch.testing.assert_close(p, torch.full((4,), 0.25, dtype=DTYPE))
    p = sampling_probabilities(torch.tensor([0.0, 1.0, 3.0]), "norm")
    torch.testing.assert_close(p, torch.tensor([0.0, 0.25, 0.75], dtype=DTYPE))


def test_bad_arguments() -> None:
    x, core, bases, _ = _setup()
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="positive"):
        sample_residual_rows(x, core, bases, 0, gen)
    with pytest.raises(ValueError, match="sampling"):
        sample_residual_rows(x, core, bases, 2, gen, "topk")
    with pytest.raises(ValueError, match="sampling"):
        sampling_probabilities(torch.ones(3), "topk")


def test_saved_bytes_formula() -> None:
    assert residual_saved_bytes(16, 768) == 16 * 768 * 4 + 16 * INDEX_BYTES
    assert residual_saved_bytes(3, 10, element_size=8) == 3 * 10 * 8 + 3 * 8
