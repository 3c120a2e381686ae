"""Analytic parameter and FLOP counts for dense and factored linears.

FLOPs count 2 per multiply-add (method.md section 5); bias adds are left out on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


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


def tucker_elements(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Elements stored for a Tucker-compressed activation: prod r_m + sum D_m r_m."""
    return math.prod(ranks) + sum(d * r for d, r in zip(shape, ranks, strict=True))


def _check(
    factored: bool, compressed: bool, rank: int | None, act_ranks: Sequence[int] | None
) -> None:
    if compressed and act_ranks is None:
        raise ValueError("compressed activations need act_ranks")
    if factored and rank is None:
        raise ValueError("a factored weight needs its rank")


def layer_memory_elements(
    act_shape: Sequence[int],
    out_features: int,
    in_features: int,
    *,
    factored: bool = False,
    compressed: bool = False,
    rank: int | None = None,
    act_ranks: Sequence[int] | None = None,
    adapter_rank: int | None = None,
    forward_only: bool = False,
    adapter_saves: str = "both",
) -> dict[str, int]:
    """Analytic elements per targeted layer (method.md section 5): saved activation, weight.

    A dense layer saves the whole input and keeps O I weight elements; ``compressed`` (asi,
    wasi) saves the Tucker core and bases instead; ``factored`` (wsi, wasi) keeps K (O + I)
    factor elements; an adapter of rank r (lora) adds r (I + O) to the weight, and its frozen
    base saves nothing: the adapter saves ``adapter_saves`` = "both" (x and x A^T: T (I + r),
    lora), "input" (x: T I, memory-exact lora) or "projection" (x A^T: T r, lora-fa);
    ``forward_only`` (mezo: no backward) saves no activation.
    """
    _check(factored, compressed, rank, act_ranks)
    full_act = math.prod(act_shape)
    act = tucker_elements(act_shape, act_ranks) if compressed else full_act  # type: ignore[arg-type]
    if adapter_rank is not None and not compressed:
        tokens = math.prod(act_shape[:-1])
        act = {
            "both": full_act + tokens * adapter_rank,
            "input": full_act,
            "projection": tokens * adapter_rank,
        }[adapter_saves]
    if forward_only:
        act = 0
    weight = rank * (out_features + in_features) if factored else out_features * in_features  # type: ignore[operator]
    if adapter_rank is not None:
        weight += adapter_rank * (out_features + in_features)
    return {"activation": act, "weight": weight}


def layer_step_flops(
    act_shape: Sequence[int],
    out_features: int,
    in_features: int,
    *,
    factored: bool = False,
    compressed: bool = False,
    rank: int | None = None,
    act_ranks: Sequence[int] | None = None,
    adapter_rank: int | None = None,
    forward_only: bool = False,
    adapter_saves: str = "both",
) -> dict[str, int]:
    """FLOPs (2 per multiply-add) of one training step of a layer, by part; no bias terms.

    forward: the layer's GEMM(s); compress: one subspace iteration per mode (two passes over
    the tensor each, the 'parallel' count, an upper bound for 'sequential') plus the core
    contraction; backward: dA and the weight gradient (dense dW, or the factors P);
    update: the WSI power iteration from factors (vanilla/asi updates are elementwise, not
    counted). The one-time SVD of compress is not part of a step.
    """
    _check(factored, compressed, rank, act_ranks)
    tokens = math.prod(act_shape[:-1])
    o, i = out_features, in_features
    numel = tokens * i
    k = rank or 0
    fwd = 2 * tokens * k * (i + o) if factored else 2 * tokens * i * o
    if adapter_rank is not None:  # W x + B (A x); dA through both paths; dW for A and B only
        fwd += 2 * tokens * adapter_rank * (i + o)
    d_a = fwd
    parts = {"forward": fwd, "compress": 0, "backward": 0, "update": 0}
    if forward_only:  # mezo: two forwards, no backward; the update is elementwise
        parts["forward"] = 2 * fwd
        parts["total"] = 2 * fwd
        return parts
    if compressed:
        assert act_ranks is not None
        iters = sum(4 * numel * r for r in act_ranks)
        core, size = 0, list(act_shape)
        for mode in sorted(range(len(size)), key=lambda m: act_ranks[m] / size[m]):
            core += 2 * math.prod(size) * act_ranks[mode]
            size[mode] = act_ranks[mode]
        parts["compress"] = iters + core
        r_last = act_ranks[-1]
        expand, size = 0, list(act_ranks)
        for mode in range(len(size) - 1):
            size[mode] = act_shape[mode]
            expand += 2 * math.prod(size) * act_ranks[mode]
        d_w = expand + 2 * tokens * o * r_last + (0 if factored else 2 * o * r_last * i)
    elif adapter_rank is not None:  # dB = dY^T (A x), dA = (B^T dY)^T x; W is frozen
        d_w = 2 * tokens * adapter_rank * (i + o)
        if adapter_saves == "projection":  # lora-fa: A frozen, dB only
            d_w = 2 * tokens * adapter_rank * o
        elif adapter_saves == "input":  # memory-exact: x A^T recomputed in backward
            d_w += 2 * tokens * adapter_rank * i
    else:
        d_w = 2 * tokens * o * i
    parts["backward"] = d_a + d_w
    if factored:
        r = act_ranks[-1] if compressed and act_ranks else i
        # R~ (I x K), W'R~ (O x K), orth (Gram + solve), R' (K x I): a handful of thin GEMMs.
        parts["update"] = 2 * k * (2 * i * r + 2 * o * r + k * i + 2 * o * k + k * o + k * i)
    parts["total"] = sum(parts.values())
    return parts


def _ref_subspace_iteration(size_1: int, size_2: int, rank: int) -> int:
    m, n = max(size_1, rank), min(size_1, rank)
    return size_1 * rank * (2 * size_2 - 1) + size_2 * rank * (2 * size_1 - 1) + 2 * m * n**2


def reference_code_flops(
    act_shape: Sequence[int],
    out_features: int,
    in_features: int,
    *,
    factored: bool = False,
    compressed: bool = False,
    rank: int | None = None,
    act_ranks: Sequence[int] | None = None,
) -> dict[str, int]:
    """FLOPs of one step as the WASI reference code counts them (3-D inputs only).

    Reproduced for comparison, with its conventions: vanilla terms as n(2m - 1), the low-rank
    weight gradient in multiply-adds (no factor 2), the N and I mode ranks swapped in the
    subspace-iteration overhead, no core contraction. Do not use these as the true cost. The
    reference counts only WASI (factored and compressed) apart; anything else as vanilla.
    """
    if len(act_shape) != 3:
        raise ValueError("the reference count exists for (B, N, I) inputs only")
    b, n, i = act_shape
    o = out_features
    if not (factored and compressed):
        # The reference code has no separate ASI/WSI count; vanilla is what it reports for them.
        fwd = b * n * o * (2 * i - 1)
        return {
            "forward": fwd,
            "backward": o * i * (2 * b * n - 1) + b * n * i * (2 * o - 1),
            "total": fwd + o * i * (2 * b * n - 1) + b * n * i * (2 * o - 1),
        }
    assert rank is not None and act_ranks is not None
    k1, k2, k3 = act_ranks
    overhead = (
        _ref_subspace_iteration(b, n * i, k1)
        + _ref_subspace_iteration(i, b * n, k2)  # the reference pairs I with the N rank
        + _ref_subspace_iteration(n, b * i, k3)  # and N with the I rank
        + _ref_subspace_iteration(o, i, rank)
    )
    low_rank_fw = b * n * rank * (2 * i - 1) + b * n * o * (2 * rank - 1)
    d_w = b * n * o * k1 + k1 * k2 * k3 * n + k1 * k3 * i * n + i * o * n * k1
    return {
        "forward": overhead + low_rank_fw,
        "backward": d_w + low_rank_fw,
        "total": overhead + 2 * low_rank_fw + d_w,
    }
