"""An unbiased weight-gradient estimate from a Tucker activation plus sampled residual rows.

ASI keeps A~ = S x_1 U_1 ... x_M U_M and uses dW~ = dY^T A~, which is biased. Here m rows of
the residual D = A - A~ (rows of the flattened (B N) x I activation) are sampled with
replacement, with probabilities p_i proportional to ||D_i|| ("norm") or uniform ("uniform"),
and kept scaled by 1 / (m p_i). Then

    dW^ = dY^T A~ + sum_{sampled i} dY_i^T D_i / (m p_i),   E[dW^] = dY^T A exactly

(method.md section 9). Saved on top of the Tucker factors: m x I values and m int64 indices.

The residual row norms need A~ row by row. A~_flat = M U_last^T with M = S expanded on every
mode but the last ((B N) x r_last, the same M the weight-gradient factors use), so the residual
is formed ``chunk`` rows at a time: the transient memory is M (rows x r_last) plus one
chunk x I block and one norm per row; no dense copy of A~ is made.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from wasi_tool.ops.tucker import tucker_expand

RESIDUAL_SAMPLINGS: tuple[str, ...] = ("norm", "uniform")
ROW_CHUNK = 1024  # rows of D formed at once when computing the row norms
INDEX_BYTES = 8  # the sampled row indices are int64


def check_sampling(sampling: str) -> None:
    if sampling not in RESIDUAL_SAMPLINGS:
        raise ValueError(f"unknown residual sampling {sampling!r}; choose {RESIDUAL_SAMPLINGS}")


def tucker_rows(core: torch.Tensor, bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """M = S expanded on every mode but the last, flattened to (rows, r_last); A~ = M U_last^T."""
    m = tucker_expand(core, [*bases[:-1], None])
    return m.reshape(-1, m.shape[-1])


@torch.no_grad()
def residual_row_norms(
    x_flat: torch.Tensor, m_flat: torch.Tensor, u_last: torch.Tensor, chunk: int = ROW_CHUNK
) -> torch.Tensor:
    """||D_i|| for every row of D = x_flat - m_flat u_last^T, ``chunk`` rows at a time."""
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    rows = x_flat.shape[0]
    out = torch.empty(rows, dtype=x_flat.dtype, device=x_flat.device)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        d = x_flat[start:stop] - m_flat[start:stop] @ u_last.T
        out[start:stop] = torch.linalg.vector_norm(d, dim=1)
    return out


def sampling_probabilities(norms: torch.Tensor, sampling: str) -> torch.Tensor:
    """p_i (float64, summing to 1): proportional to ``norms`` ("norm") or uniform.

    A zero (or non-finite) total falls back to uniform: then every residual row is zero and
    any p gives the exact gradient."""
    check_sampling(sampling)
    n = norms.shape[0]
    uniform = torch.full((n,), 1.0 / n, dtype=torch.float64, device=norms.device)
    if sampling == "uniform":
        return uniform
    w = norms.to(torch.float64)
    total = w.sum()
    if not bool(torch.isfinite(total)) or float(total) <= 0.0:
        return uniform
    return w / total


@torch.no_grad()
def sample_residual_rows(
    x: torch.Tensor,
    core: torch.Tensor,
    bases: Sequence[torch.Tensor],
    m: int,
    generator: torch.Generator,
    sampling: str = "norm",
    chunk: int = ROW_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw m residual rows of ``x`` against its Tucker approximation (core, bases).

    Args:
        x: the activation (..., I), as compressed into ``core`` and ``bases``.
        m: rows to draw, with replacement (a row may be drawn twice; each draw is kept).
        generator: the (CPU) generator the draws come from.
        sampling: "norm" (p_i proportional to ||D_i||, the lower-variance choice) or "uniform"
            (p_i = 1 / rows; no row norms are computed).

    Returns:
        (rows, index): rows (m x I) = D_index / (m p_index) in x's dtype, index (m,) int64.
    """
    if m < 1:
        raise ValueError(f"residual rows must be positive, got {m}")
    check_sampling(sampling)
    x_flat = x.reshape(-1, x.shape[-1])
    n = x_flat.shape[0]
    m_flat = tucker_rows(core, bases)
    u_last = bases[-1]
    if sampling == "uniform":
        index = torch.randint(n, (m,), generator=generator)
        scale = torch.full((m,), n / m, dtype=torch.float64)
    else:
        p = sampling_probabilities(residual_row_norms(x_flat, m_flat, u_last, chunk), "norm")
        p_cpu = p.cpu()
        index = torch.multinomial(p_cpu, m, replacement=True, generator=generator)
        scale = 1.0 / (m * p_cpu[index])
    index = index.to(x.device)
    d = x_flat.index_select(0, index) - m_flat.index_select(0, index) @ u_last.T
    rows = d * scale.to(device=x.device, dtype=x.dtype)[:, None]
    return rows.contiguous(), index


def residual_grad_factors(
    grad_out: torch.Tensor, rows: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the residual term sum_i dY_i^T D_i / (m p_i) = Q V^T: (Q (O x m), V (I x m)).

    V is not orthonormal."""
    dy = grad_out.reshape(-1, grad_out.shape[-1]).index_select(0, index)
    return dy.T, rows.T


def residual_weight_grad(
    grad_out: torch.Tensor, rows: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """The residual term of dW^ as a dense O x I matrix: dY_index^T rows."""
    q, v = residual_grad_factors(grad_out, rows, index)
    return q @ v.T


def residual_saved_bytes(m: int, in_features: int, element_size: int = 4) -> int:
    """Bytes the residual sample adds per layer: m x I values and m int64 indices."""
    return m * in_features * element_size + m * INDEX_BYTES
