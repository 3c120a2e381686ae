"""Rank selection by explained variance (method.md section 1)."""

from __future__ import annotations

import math

import torch

from wasi_tool.errors import WasiToolError

DEFAULT_EPS = 0.8  # the paper's main explained-variance threshold, the default everywhere


def check_eps(eps: float, name: str = "eps") -> float:
    """Return ``eps`` as a float if it lies in (0, 1], else raise WasiToolError."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise WasiToolError(f"{name} must be a number in (0, 1], got {eps!r}") from None
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise WasiToolError(f"{name} must be in (0, 1], got {eps!r}")
    return value


def energy_curve(s: torch.Tensor) -> torch.Tensor:
    """Cumulative explained variance sum_{j<=k} s_j^2 / sum_j s_j^2 for k = 1..len(s), float64.

    The last entry is exactly 1.0 (division of the total by itself), so eps = 1 always
    selects a rank no larger than len(s). A zero spectrum gives a curve of ones.
    """
    if s.ndim != 1 or s.numel() == 0:
        raise WasiToolError(f"expected a non-empty 1-D spectrum, got shape {tuple(s.shape)}")
    cum = torch.cumsum(s.detach().to(torch.float64) ** 2, dim=0)
    total = cum[-1].item()
    if total <= 0.0:
        return torch.ones_like(cum)
    return cum / total


def rank_by_energy(s: torch.Tensor, eps: float) -> int:
    """Smallest k with energy_curve(s)[k-1] >= eps (eps in (0, 1]); at least 1."""
    eps = check_eps(eps)
    curve = energy_curve(s)
    k = int(torch.searchsorted(curve, torch.tensor([eps], dtype=curve.dtype)).item()) + 1
    return min(k, s.numel())


def rank_by_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """K = ceil(ratio * min(O, I)) for ratio in (0, 1]; at least 1."""
    ratio = check_eps(ratio, "rank ratio")
    full = min(out_features, in_features)
    return max(1, min(full, math.ceil(ratio * full - 1e-9)))


def breakeven_rank(out_features: int, in_features: int) -> float:
    """O*I/(O+I): a factored layer of rank K saves parameters and FLOPs only when K is below."""
    return out_features * in_features / (out_features + in_features)


def saves_flops(out_features: int, in_features: int, rank: int) -> bool:
    """True when rank K strictly lowers the layer's parameters and FLOPs (K < O*I/(O+I))."""
    return rank * (out_features + in_features) < out_features * in_features
