"""Pure tensor math: no modules, no I/O."""

from wasi_tool.ops.accounting import (
    dense_flops_per_token,
    dense_params,
    factored_flops_per_token,
    factored_params,
)
from wasi_tool.ops.budget import allocate_ranks, check_budget, dropped_energy
from wasi_tool.ops.rank import (
    DEFAULT_EPS,
    breakeven_rank,
    check_eps,
    energy_curve,
    rank_by_energy,
    rank_by_ratio,
    saves_flops,
)
from wasi_tool.ops.svd import Spectrum, factored_spectrum, kept_energy, spectrum, truncate
from wasi_tool.ops.whiten import (
    DEFAULT_DAMP,
    WhitenedFactors,
    Whitening,
    relative_output_error,
    whitened_svd,
    whitening,
)

__all__ = [
    "DEFAULT_DAMP",
    "DEFAULT_EPS",
    "Spectrum",
    "WhitenedFactors",
    "Whitening",
    "allocate_ranks",
    "breakeven_rank",
    "check_budget",
    "check_eps",
    "dense_flops_per_token",
    "dense_params",
    "dropped_energy",
    "energy_curve",
    "factored_flops_per_token",
    "factored_params",
    "factored_spectrum",
    "kept_energy",
    "rank_by_energy",
    "rank_by_ratio",
    "relative_output_error",
    "saves_flops",
    "spectrum",
    "truncate",
    "whitened_svd",
    "whitening",
]
