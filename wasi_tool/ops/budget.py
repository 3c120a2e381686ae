"""Ranks under one parameter budget (method.md section 8; SVD-LLM v2's heterogeneous ratios).

Each layer l of rank K_l costs K_l (O_l + I_l) factor parameters and leaves the truncation
error sum_{j>K_l} s_{l,j}^2 (its squared singular values; whitened ones measure the output
error on the calibration data). One more rank in layer l removes s_{l,K_l+1}^2 of error for
O_l + I_l parameters. Because s is non-increasing and a layer's per-rank cost is constant,
that ratio falls as the layer's rank grows, so taking ranks in order of error removed per
parameter (skipping any that no longer fits) keeps every layer's ranks a prefix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from wasi_tool.errors import WasiToolError


def check_budget(fraction: float, name: str = "rank_budget") -> float:
    """``fraction`` as a float if it lies in (0, 1], else raise WasiToolError."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise WasiToolError(f"{name} must be a fraction in (0, 1], got {fraction!r}") from None
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise WasiToolError(f"{name} must be a fraction in (0, 1], got {fraction!r}")
    return value


def allocate_ranks(
    values: Mapping[str, torch.Tensor],
    costs: Mapping[str, int],
    budget: int,
    caps: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Per-layer ranks whose summed cost sum_l K_l costs[l] fits ``budget``, chosen greedily
    by s_{l,j}^2 / costs[l] (error removed per parameter added), every layer at rank >= 1.

    Args:
        values: per layer, its singular values s (non-increasing; whitened or plain).
        costs: per layer, the parameters one rank costs (O + I).
        budget: the parameters the ranks may use in all.
        caps: per layer, the highest rank allowed (default len(s)).

    Returns:
        ranks with sum(K_l * costs[l]) <= budget, and *maximal*: no layer below its cap can
        take one more rank without exceeding the budget (that is what meeting it means).

    Raises WasiToolError when rank 1 everywhere already exceeds the budget.
    """
    names = list(values)
    if not names:
        return {}
    cap = {
        n: max(1, min(int((caps or {}).get(n, values[n].numel())), values[n].numel()))
        for n in names
    }
    ranks = dict.fromkeys(names, 1)
    spent = sum(int(costs[n]) for n in names)
    if spent > budget:
        raise WasiToolError(
            f"a budget of {budget:,} parameters is below rank 1 in every layer ({spent:,})"
        )
    # (gain per parameter, layer order, rank index): ties go to the earlier layer, lower rank
    items: list[tuple[float, int, int]] = []
    for li, n in enumerate(names):
        sq = values[n].detach().to(torch.float64) ** 2
        gains = (sq[1 : cap[n]] / float(costs[n])).tolist()
        items.extend((-g, li, j) for j, g in enumerate(gains, start=1))
    items.sort()
    for _, li, j in items:
        n = names[li]
        c = int(costs[n])
        if ranks[n] == j and spent + c <= budget:  # j is the 0-based index of rank j + 1
            ranks[n] += 1
            spent += c
    return ranks


def dropped_energy(values: Mapping[str, torch.Tensor], ranks: Mapping[str, int]) -> float:
    """sum over layers of sum_{j>K_l} s_{l,j}^2: the summed squared truncation error."""
    return float(
        sum(float((values[n].detach().to(torch.float64)[ranks[n] :] ** 2).sum()) for n in ranks)
    )
