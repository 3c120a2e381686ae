"""Tucker compression of activations by warm-started subspace iteration (ASI, method.md 3-4).

Every mode-m operation views the tensor as (pre, D_m, post), a free reshape of a contiguous
tensor, so no permuted copy is made: a mode product is one batched matmul, and the mode Gram
applied to a basis, A_(m) A_(m)^T U, is two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _split(shape: Sequence[int], mode: int) -> tuple[int, int, int]:
    pre = math.prod(shape[:mode])
    post = math.prod(shape[mode + 1 :])
    return pre, shape[mode], post


def mode_product(
    t: torch.Tensor, u: torch.Tensor, mode: int, transpose: bool = False
) -> torch.Tensor:
    """t x_mode M with M = u^T (``transpose``: D_m -> r) or M = u (r -> D_m).

    ``u`` is D_m x r. Returns a contiguous tensor with dimension ``mode`` replaced.
    """
    shape = list(t.shape)
    pre, d, post = _split(shape, mode)
    m = u.T if transpose else u  # (out, d)
    out = m.shape[0]
    if post == 1:  # last mode: one GEMM on the (pre, d) view
        res = t.reshape(pre, d) @ m.T
    elif pre == 1:  # first mode: one GEMM on the (d, post) view
        res = m @ t.reshape(d, post)
    else:
        res = torch.matmul(m, t.reshape(pre, d, post))
    shape[mode] = out
    return res.reshape(shape)


def mode_gram_apply(t: torch.Tensor, u: torch.Tensor, mode: int) -> torch.Tensor:
    """A_(m) A_(m)^T U (D_m x r) without forming the unfolding or the D_m x D_m Gram."""
    pre, d, post = _split(t.shape, mode)
    z = mode_product(t, u, mode, transpose=True)  # (.., r, ..)
    r = u.shape[1]
    if post == 1:
        return t.reshape(pre, d).T @ z.reshape(pre, r)
    if pre == 1:
        return t.reshape(d, post) @ z.reshape(r, post).T
    return torch.matmul(t.reshape(pre, d, post), z.reshape(pre, r, post).transpose(1, 2)).sum(0)


def orth(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis Q of the columns of a tall ``x`` (D x r), with Q^T x upper triangular
    and a positive diagonal (the unique thin QR), so the result is deterministic.

    Cholesky QR in float64: the Gram matrix (one GEMM), its Cholesky factor R (r x r), R's
    inverse (r x r) and Q = x R^-1 as one more GEMM. 2-7x faster here than Householder QR on the
    shapes WASI uses; float64 keeps it accurate up to cond(x) ~ 1e6. The inverse applied as a
    GEMM instead of a triangular solve over the D x r matrix (as until 2026-12-08) gives the same
    Q to float64 rounding and is 1.4x faster at ViT-B/32's fc1 (3072 x 192: 8.3 vs 11.6 ms).
    A Gram matrix that is not positive definite (rank-deficient x), or a Q whose squared
    Frobenius norm is not its column count (non-finite, or not orthonormal), falls back to
    Householder QR.
    """
    xd = x.to(torch.float64)
    cols = x.shape[1]
    r, info = torch.linalg.cholesky_ex(xd.T @ xd, upper=True)
    if int(info) == 0:
        eye = torch.eye(cols, dtype=torch.float64, device=x.device)
        q = xd @ torch.linalg.solve_triangular(r, eye, upper=True)
        # ||Q||_F^2 = r for orthonormal columns; NaN and inf fail the test too (one reduction,
        # against the four kernels of isfinite().all() over the D x r matrix), in float64
        # whatever x's dtype (a bfloat16 Q is orthonormal to its own rounding only)
        if abs(float(torch.linalg.vector_norm(q)) ** 2 - cols) <= 1e-3 * cols:
            return q.to(x.dtype)
    q, r = torch.linalg.qr(x)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs


def subspace_step(t: torch.Tensor, u: torch.Tensor, mode: int) -> torch.Tensor:
    """One warm-started subspace iteration for mode ``mode``: orth(A_(m) A_(m)^T U)."""
    return orth(mode_gram_apply(t, u, mode))


def random_basis(
    dim: int, rank: int, generator: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """A seeded Gaussian D x r start with orthonormal columns."""
    g = torch.randn(dim, rank, generator=generator, dtype=torch.float32).to(dtype)
    return orth(g)


def compress_order(shape: Sequence[int], ranks: Sequence[int]) -> list[int]:
    """Modes ordered by how much each shrinks the tensor (largest reduction first)."""
    return sorted(range(len(shape)), key=lambda m: ranks[m] / shape[m])


def tucker_core(t: torch.Tensor, bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """S = A x_1 U_1^T x_2 U_2^T ... (r_1 x r_2 x ...), shrinking the cheapest way."""
    ranks = [u.shape[1] for u in bases]
    core = t
    for mode in compress_order(t.shape, ranks):
        core = mode_product(core, bases[mode], mode, transpose=True)
    return core


def tucker_expand(core: torch.Tensor, bases: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """S x_1 U_1 x_2 U_2 ... for the modes whose basis is given (None leaves that mode as is)."""
    out = core
    for mode, u in enumerate(bases):
        if u is not None:
            out = mode_product(out, u, mode)
    return out


ASI_ORDERS: tuple[str, ...] = ("sequential", "parallel")


def tucker_compress(
    t: torch.Tensor, bases: Sequence[torch.Tensor], order: str = "sequential"
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One ASI step: refresh every mode's basis by one subspace iteration, then the core.

    Args:
        t: the activation (B, N, C) or (B, H, W, C); not modified.
        bases: per-mode warm starts U_m (D_m x r_m) with orthonormal columns.
        order: "parallel" iterates every mode on the full tensor, U_m <- orth(A_(m) A_(m)^T U_m)
            (the reference code). "sequential" visits the modes largest-reduction first and
            iterates each on the tensor already projected onto the modes before it (one sweep
            of HOOI); the core falls out of the same sweep. Both are exact at full ranks;
            sequential reads the full tensor 3 times instead of 2M + 1.

    Returns:
        (core S, new bases). Callers run this under ``torch.no_grad()``.
    """
    if order == "parallel":
        new = [subspace_step(t, u, mode) for mode, u in enumerate(bases)]
        return tucker_core(t, new), new
    if order != "sequential":
        raise ValueError(f"unknown ASI order {order!r}; choose from {ASI_ORDERS}")
    new = list(bases)
    core = t
    for mode in compress_order(t.shape, [u.shape[1] for u in bases]):
        new[mode] = subspace_step(core, bases[mode], mode)
        core = mode_product(core, new[mode], mode, transpose=True)
    return core, new


def lowrank_weight_grad_factors(
    grad_out: torch.Tensor, core: torch.Tensor, bases: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of G = dY_flat^T A~_flat for the Tucker-compressed activation A~ (method.md 3).

    M = S expanded on every mode but the last (shape (..., r_last)); P = dY_flat^T M_flat (O x r).
    G = P U_last^T, never formed. Returns (P, U_last).
    """
    m = tucker_expand(core, [*bases[:-1], None])
    r = m.shape[-1]
    p = _narrow_t_times(m.reshape(-1, r), grad_out.reshape(-1, grad_out.shape[-1]))
    return p, bases[-1]


def lowrank_weight_and_bias_grad(
    grad_out: torch.Tensor, core: torch.Tensor, bases: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lowrank_weight_grad_factors`` and the bias gradient sum(dY) from one GEMM:
    dY_flat^T [M_flat 1] (O x (r + 1)), whose last column is the bias gradient. It saves the
    separate pass over dY (O x BN reads) that the sum would make. Returns (P, U_last, db);
    P and db are views of that one O x (r + 1) result."""
    m = tucker_expand(core, [*bases[:-1], None])
    r = m.shape[-1]
    flat = grad_out.reshape(-1, grad_out.shape[-1])
    ext = m.new_empty(flat.shape[0], r + 1)
    ext[:, :r] = m.reshape(-1, r)
    ext[:, r] = 1.0
    pe = _narrow_t_times(ext, flat)
    return pe[:, :r], bases[-1], pe[:, r]


def _narrow_t_times(narrow: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
    """wide^T narrow (O x r) for a tall, narrow (BN x r) and a wide (BN x O) matrix, computed as
    (narrow^T wide)^T: the same sums, returned as a transposed view. With r ~ 32 the product
    streams the BN x O matrix and is bound by memory; in this order BLAS reads it faster
    (ViT-B/32 fc1, 3200 x 3072 against 33 columns: 7.3 vs 9.3 ms)."""
    return (narrow.T @ wide).T
