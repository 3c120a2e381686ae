"""Analytic parameter and FLOP counts for dense and factored linears.

FLOPs count 2 per multiply-add (method.md section 5); bias adds are left out on both sides.
"""

from __future__ import annotations


def dense_params(out_features: int, in_features: int, bias: bool) -> int:
    """Parameters of a dense O x I linear."""
    return out_features * in_features + (out_features if bias else 0)


def factored_params(out_features: int, in_features: int, rank: int, bias: bool) -> int:
    """Parameters of L (O x K) plus R (K x I), plus bias."""
    return rank * (out_features + in_features) + (out_features if bias else 0)


def dense_flops_per_token(out_features: int, in_features: int) -> int:
    """Forward FLOPs of one token through a dense linear: 2 O I."""
    return 2 * out_features * in_features


def factored_flops_per_token(out_features: int, in_features: int, rank: int) -> int:
    """Forward FLOPs of one token through x R^T then L^T: 2 K (O + I)."""
    return 2 * rank * (out_features + in_features)
