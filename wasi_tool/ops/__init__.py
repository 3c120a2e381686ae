"""Pure tensor math: no modules, no I/O."""

from wasi_tool.ops.accounting import (
    dense_flops_per_token,
    dense_params,
    factored_flops_per_token,
    factored_params,
)
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

__all__ = [
    "DEFAULT_EPS",
    "Spectrum",
    "breakeven_rank",
    "check_eps",
    "dense_flops_per_token",
    "dense_params",
    "energy_curve",
    "factored_flops_per_token",
    "factored_params",
    "factored_spectrum",
    "kept_energy",
    "rank_by_energy",
    "rank_by_ratio",
    "saves_flops",
    "spectrum",
    "truncate",
]
