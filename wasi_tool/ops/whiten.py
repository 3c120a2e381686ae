"""Data-aware truncation: the truncated SVD of a weight in the metric of its inputs
(method.md section 8, SVD-LLM's truncation-aware whitening).

For a calibration input matrix X (n x I) with Gram matrix C = X^T X and any S with
S S^T = C, ||X M^T||_F = ||M S||_F for every O x I matrix M. The SVD of W S = U diag(s) Vh,
truncated to K and mapped back by S^{-1}, is therefore the rank-K W_K with the least output
error ||X (W - W_K)^T||_F on the calibration data, and that error is sqrt(sum_{j>K} s_j^2).

S comes from an eigendecomposition, C + lambda I = V diag(d) V^T, S = V diag(sqrt(d)):
unlike a Cholesky it tolerates a rank-deficient C, and its inverse is applied as
diag(1/sqrt(d)) V^T (a pseudo-inverse that drops directions below the round-off cutoff), never
as an explicit inverse of an ill-conditioned matrix. lambda is a small multiple (``damp``) of
C's mean diagonal; it keeps S invertible, so at full rank W is returned exactly, and it leaves
the directions the calibration data never excites close to plain SVD's choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from wasi_tool.errors import WasiToolError
from wasi_tool.ops.rank import rank_by_energy
from wasi_tool.ops.svd import Spectrum, factored_spectrum, spectrum

DEFAULT_DAMP = 1e-3  # lambda = DEFAULT_DAMP * mean(diag(C))


@dataclass(frozen=True)
class Whitening:
    """S = V diag(root) with S S^T = C + lambda I (float64), and its pseudo-inverse's factors."""

    basis: torch.Tensor  # V, I x I, orthonormal columns
    root: torch.Tensor  # sqrt(d), I
    inv_root: torch.Tensor  # 1 / sqrt(d) where d is above the round-off cutoff, else 0
    damp: float  # lambda, absolute (damp * mean diagonal of C)

    @property
    def rank(self) -> int:
        """How many directions S keeps (I unless C + lambda I is singular)."""
        return int((self.inv_root > 0).sum())

    def whiten(self, m: torch.Tensor) -> torch.Tensor:
        """M S for an (.. x I) matrix M (float64)."""
        return (m.to(torch.float64) @ self.basis) * self.root

    def unwhiten(self, m: torch.Tensor) -> torch.Tensor:
        """M S^+ for an (.. x I) matrix M in whitened coordinates (float64)."""
        return (m.to(torch.float64) * self.inv_root) @ self.basis.T


def check_damp(damp: float) -> float:
    """``damp`` as a float if it is finite and >= 0, else raise WasiToolError."""
    try:
        value = float(damp)
    except (TypeError, ValueError):
        raise WasiToolError(f"damping must be a number >= 0, got {damp!r}") from None
    if not math.isfinite(value) or value < 0:
        raise WasiToolError(f"damping must be a finite number >= 0, got {damp!r}")
    return value


def whitening(gram: torch.Tensor, damp: float = DEFAULT_DAMP) -> Whitening:
    """S with S S^T = C + lambda I from an I x I Gram matrix C, lambda = damp * mean diag(C).

    Raises WasiToolError when C is not square or is zero (no calibration signal reached the
    layer: there is no metric to truncate in).
    """
    damp = check_damp(damp)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise WasiToolError(f"a Gram matrix is square, got shape {tuple(gram.shape)}")
    c = gram.detach().to(torch.float64)
    c = (c + c.T) / 2  # symmetric up to the accumulation's round-off
    mean_diag = float(torch.diagonal(c).mean())
    if not math.isfinite(mean_diag):
        raise WasiToolError("the Gram matrix has non-finite entries")
    if mean_diag <= 0.0:
        raise WasiToolError("the Gram matrix is zero: the calibration inputs were all zero")
    lam = damp * mean_diag
    d, v = torch.linalg.eigh(c + lam * torch.eye(c.shape[0], dtype=c.dtype))
    d = d.clamp_min(0.0)
    cutoff = float(d.max()) * c.shape[0] * torch.finfo(torch.float64).eps
    root = d.sqrt()
    inv_root = torch.where(d > cutoff, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    return Whitening(v, torch.where(d > cutoff, root, torch.zeros_like(root)), inv_root, lam)


def whitened_spectrum(weight: torch.Tensor, white: Whitening) -> Spectrum:
    """Thin SVD of W S (float64): s is the whitened spectrum, Vh is in whitened coordinates."""
    return spectrum(white.whiten(weight))


def whitened_factored_spectrum(
    left: torch.Tensor, right: torch.Tensor, white: Whitening
) -> Spectrum:
    """Thin SVD of (L R) S from the factors (L orthonormal), without the O x I product."""
    return factored_spectrum(left, white.whiten(right))


def whitened_truncate(
    spec: Spectrum, white: Whitening, rank: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the rank-K W_K = U_K diag(s_K) Vh_K S^+: L = U_K (orthonormal columns),
    R = diag(s_K) Vh_K S^+ (K x I). Contiguous tensors of ``dtype``."""
    left = spec.u[:, :rank].to(dtype).contiguous()
    right = white.unwhiten(spec.s[:rank, None] * spec.vh[:rank]).to(dtype).contiguous()
    return left, right


@dataclass(frozen=True)
class WhitenedFactors:
    """What ``whitened_svd`` returns: W ~= left @ right in the metric of the inputs."""

    left: torch.Tensor  # O x K, orthonormal columns
    right: torch.Tensor  # K x I
    s: torch.Tensor  # the whole whitened spectrum (float64), non-increasing
    rank: int
    damp: float  # lambda, absolute

    def error(self) -> float:
        """sqrt(sum_{j>K} s_j^2): ||X (W - L R)^T||_F in the (damped) calibration metric."""
        return float((self.s[self.rank :] ** 2).sum().sqrt())


def whitened_svd(
    weight: torch.Tensor,
    gram: torch.Tensor,
    eps: float | None = None,
    *,
    rank: int | None = None,
    damp: float = DEFAULT_DAMP,
) -> WhitenedFactors:
    """The rank-K factors of ``weight`` (O x I) that minimise ||X (W - L R)^T||_F, given the
    input Gram matrix ``gram`` = X^T X (I x I).

    K is ``rank`` if given, else the smallest rank keeping ``eps`` of the whitened spectrum's
    energy (the output energy on the calibration data). At K = min(O, I) this returns W (to
    float round-off) whenever C + lambda I is non-singular (always, for damp > 0).
    """
    if weight.ndim != 2 or gram.shape != (weight.shape[1], weight.shape[1]):
        raise WasiToolError(
            f"a weight of shape {tuple(weight.shape)} needs an I x I Gram matrix, "
            f"got {tuple(gram.shape)}"
        )
    if (eps is None) == (rank is None):
        raise WasiToolError("give eps or rank, not both or neither")
    white = whitening(gram, damp)
    spec = whitened_spectrum(weight, white)
    k = int(rank) if rank is not None else rank_by_energy(spec.s, eps or 1.0)
    if not 1 <= k <= spec.s.numel():
        raise WasiToolError(f"rank {k} outside [1, {spec.s.numel()}]")
    left, right = whitened_truncate(spec, white, k, weight.dtype)
    return WhitenedFactors(left, right, spec.s, k, white.damp)


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """||X delta^T||_F from the Gram matrix C = X^T X alone: sqrt(tr(delta C delta^T))."""
    d = delta.detach().to(torch.float64)
    sq = float(((d @ gram.to(torch.float64)) * d).sum())
    return math.sqrt(max(sq, 0.0))


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """||X (W - W_K)^T||_F / ||X W^T||_F from C = X^T X (0 when the reference output is 0)."""
    w = weight.detach().to(torch.float64)
    ref = output_error(w, gram)
    return 0.0 if ref == 0.0 else output_error(w - approx.detach().to(torch.float64), gram) / ref
