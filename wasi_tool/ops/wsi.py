"""The factor-only WSI weight update (method.md section 3).

The dense SGD step would give W' = (1 - lr wd) L R - lr c G with G = P U^T (or G = P when the
activation was not compressed, U = None). One warm-started power iteration keeps W' in a rank-K
subspace using only factor-sized products; no O x I tensor is formed when U is given.
"""

from __future__ import annotations

from typing import Literal

import torch

from wasi_tool.ops.tucker import orth

UpdateForm = Literal["projection", "paper"]
UPDATE_FORMS: tuple[str, ...] = ("projection", "paper")


def _gt_times(p: torch.Tensor, u: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """G^T X for X (O x K): U (P^T X), I x K."""
    pt_x = p.T @ x
    return pt_x if u is None else u @ pt_x


def _g_times(p: torch.Tensor, u: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """G Y for Y (I x K): P (U^T Y), O x K."""
    return p @ (y if u is None else u.T @ y)


def _xt_g(p: torch.Tensor, u: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """X^T G for X (O x K): (X^T P) U^T, K x I."""
    xt_p = x.T @ p
    return xt_p if u is None else xt_p @ u.T


@torch.no_grad()
def wsi_update(
    left: torch.Tensor,
    right: torch.Tensor,
    p: torch.Tensor,
    u: torch.Tensor | None,
    lr: float,
    weight_decay: float = 0.0,
    clip_coef: float = 1.0,
    form: UpdateForm = "projection",
) -> tuple[torch.Tensor, torch.Tensor]:
    """New factors (L', R') of the rank-K weight after one SGD step with gradient G = P U^T.

    Args:
        left: L (O x K) with orthonormal columns; right: R (K x I).
        p: P (O x r); u: U (I x r) with orthonormal columns, or None for G = P (O x I).
        lr, weight_decay: the SGD step: W' = (1 - lr wd) W - lr clip_coef G.
        clip_coef: the global-norm clip factor applied to G.
        form: "projection" gives R' = L'^T W' (effective weight L' L'^T W'); "paper" gives
            R' = R~^T = L^T W' from the old basis (the reference code's Algorithm 1).
    """
    decay = 1.0 - lr * weight_decay
    step = lr * clip_coef
    r_tilde = decay * right.T - step * _gt_times(p, u, left)  # W'^T L, I x K
    w_r = decay * (left @ (right @ r_tilde)) - step * _g_times(p, u, r_tilde)  # W' R~, O x K
    new_left = orth(w_r)
    if form == "paper":
        return new_left, r_tilde.T.contiguous()
    if form != "projection":
        raise ValueError(f"unknown WSI update form {form!r}")
    new_right = decay * ((new_left.T @ left) @ right) - step * _xt_g(p, u, new_left)
    return new_left, new_right
