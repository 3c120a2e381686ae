"""Server-side aggregation: FedAvg for ordinary tensors, and the weighted mean of low-rank
products truncated back to rank K without forming the O x I matrix.

For clients i with factors L_i (O x K), R_i (K x I) and weights w_i (summing to 1),

    M = sum_i w_i L_i R_i = A B,   A = [w_1 L_1 ... w_n L_n] (O x nK),   B = [R_1; ...; R_n]

has rank <= nK. With reduced QR A = Q_a R_a and B^T = Q_b R_b, M = Q_a (R_a R_b^T) Q_b^T; the
SVD of the small core C = R_a R_b^T = U S V^T gives M's SVD, M = (Q_a U) S (Q_b V)^T, so its
best rank-K approximation (Eckart-Young) is L = Q_a U_K (orthonormal columns, the gauge
FactoredLinear and WASI keep), R = S_K V_K^T Q_b^T. Cost O((O + I) (nK)^2 + (nK)^3) instead of
O(O I nK) and O(O I) memory for the dense route. Computed in float64, returned in the factors'
dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from wasi_tool.errors import WasiToolError


def normalized(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum 1 (sample counts, usually)."""
    total = float(sum(weights))
    if not weights or total <= 0 or any(w < 0 for w in weights):
        raise WasiToolError(f"aggregation weights must be >= 0 and not all 0, got {weights}")
    return [float(w) / total for w in weights]


def server_step(weights: Sequence[float], server_lr: float) -> list[float]:
    """Coefficients of [previous global, client 1, ..., client n] for a server learning rate
    (FedOpt's server SGD; Reddi et al. 2021): the new global is G + lr (sum_i w_i T_i - G) =
    (1 - lr) G + sum_i lr w_i T_i. They sum to 1; the first is negative when lr > 1 (the step
    goes past the clients' mean, as a larger step of the same direction)."""
    if not 0 < server_lr <= 100:
        raise WasiToolError(f"server_lr must be in (0, 100], got {server_lr}")
    return [1.0 - server_lr, *(server_lr * w for w in normalized(weights))]


def fedavg(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True
) -> torch.Tensor:
    """The weighted mean sum_i w_i T_i (FedAvg), in float64, returned in the inputs' dtype.
    ``normalize=False`` takes the weights as given (server_step's coefficients)."""
    w = normalized(weights) if normalize else list(weights)
    out = sum(wi * t.double() for wi, t in zip(w, tensors, strict=True))
    return torch.as_tensor(out).to(tensors[0].dtype)


def product_svd(
    lefts: Sequence[torch.Tensor],
    rights: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD (U, S, V^T) of sum_i w_i L_i R_i from QR of the stacked factors and the
    SVD of the (nK x nK) core; U: O x r, S: r, V^T: r x I with r = min(O, I, nK)."""
    w = normalized(weights) if normalize else list(weights)
    if len(lefts) != len(rights) or not lefts:
        raise WasiToolError("need as many left factors as right factors, at least one")
    a = torch.cat([wi * left.double() for wi, left in zip(w, lefts, strict=True)], dim=1)
    b = torch.cat([right.double() for right in rights], dim=0)
    qa, ra = torch.linalg.qr(a, mode="reduced")  # O x m, m x nK
    qb, rb = torch.linalg.qr(b.T, mode="reduced")  # I x p, p x nK
    u, s, vh = torch.linalg.svd(ra @ rb.T, full_matrices=False)
    return qa @ u, s, vh @ qb.T


def aggregate_factors(
    lefts: Sequence[torch.Tensor],
    rights: Sequence[torch.Tensor],
    weights: Sequence[float],
    rank: int,
    *,
    balanced: bool = False,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors (L, R) of sum_i w_i L_i R_i, and all its singular values.

    ``balanced=False``: L = U_K with orthonormal columns, R = S_K V_K^T (the FactoredLinear /
    WASI gauge); ``balanced=True``: L = U_K S_K^1/2, R = S_K^1/2 V_K^T (LoRA's B and A). A rank
    below ``rank`` (fewer singular values) is padded with zero columns/rows, so shapes hold.
    """
    dtype = lefts[0].dtype
    u, s, vh = product_svd(lefts, rights, weights, normalize=normalize)
    k = min(rank, s.numel())
    if balanced:
        root = s[:k].sqrt()
        left, right = u[:, :k] * root, root[:, None] * vh[:k]
    else:
        left, right = u[:, :k], s[:k, None] * vh[:k]
    if k < rank:
        left = torch.cat([left, left.new_zeros(left.shape[0], rank - k)], dim=1)
        right = torch.cat([right, right.new_zeros(rank - k, right.shape[1])], dim=0)
    return left.to(dtype), right.to(dtype), s
