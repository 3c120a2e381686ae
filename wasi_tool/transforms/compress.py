"""compress_: SVD-factor the target linears of a model in place, rank by explained variance.

torchao-style: a config dataclass plus one function that changes the model in place and
returns its report; the compress stage (stages/compress.py) adds loading and the artifact.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from wasi_tool.config import StageConfig, register_config
from wasi_tool.errors import WasiToolError
from wasi_tool.models.targets import check_patterns, select_targets, split_patterns
from wasi_tool.nn.factored import FactoredLinear
from wasi_tool.nn.swap import set_submodule
from wasi_tool.ops import (
    DEFAULT_EPS,
    accounting,
    check_eps,
    energy_curve,
    kept_energy,
    rank_by_energy,
    rank_by_ratio,
    saves_flops,
    spectrum,
)


@register_config
@dataclass
class CompressConfig(StageConfig):
    """How to factor a model.

    Args:
        targets: ``mlp`` (MLP fc1/fc2 of every block), ``attn`` (qkv and proj), ``all``, or
            comma-separated globs over module names. The classifier head is never matched by a
            preset or a wildcard.
        exclude: globs over module names to leave dense.
        eps: explained-variance threshold in (0, 1] for each layer's rank (0.8 when neither
            eps nor rank_ratio is given).
        rank_ratio: instead of eps, K = ceil(rank_ratio * min(O, I)).
        force: factor a layer even when its rank would not save FLOPs (K >= O*I/(O+I)).
    """

    stage: ClassVar[str] = "compress"

    targets: str = "mlp"
    exclude: list[str] = field(default_factory=list)
    eps: float | None = None
    rank_ratio: float | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.eps is not None and self.rank_ratio is not None:
            raise WasiToolError("give eps or rank_ratio, not both")
        if self.rank_ratio is not None:
            self.rank_ratio = check_eps(self.rank_ratio, "rank_ratio")
        else:
            self.eps = check_eps(DEFAULT_EPS if self.eps is None else self.eps, "eps")
        check_patterns(self.targets, "targets")
        check_patterns(self.exclude, "exclude")
        if not split_patterns(self.targets):
            raise WasiToolError("targets is empty")
        self.exclude = split_patterns(self.exclude)


@dataclass
class LayerReport:
    """What compress did to one target layer. ``curve`` is the cumulative energy (not saved)."""

    name: str
    out_features: int
    in_features: int
    rank: int
    full_rank: int
    energy: float
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    status: str  # "factored", "dense: no saving", "unchanged"
    curve: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("curve")
        return out


@dataclass
class CompressReport:
    """Per-layer results and totals of one compress call."""

    config: CompressConfig
    layers: list[LayerReport]
    model_params_before: int
    model_params_after: int
    seconds: float

    @property
    def target_params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def target_params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def flops_before(self) -> int:
        return sum(r.flops_before for r in self.layers)

    @property
    def flops_after(self) -> int:
        return sum(r.flops_after for r in self.layers)

    def totals(self) -> dict[str, Any]:
        return {
            "layers": len(self.layers),
            "factored": sum(r.status == "factored" for r in self.layers),
            "target_params_before": self.target_params_before,
            "target_params_after": self.target_params_after,
            "target_flops_per_token_before": self.flops_before,
            "target_flops_per_token_after": self.flops_after,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "target_compression": self.target_params_before / max(1, self.target_params_after),
            "model_compression": self.model_params_before / max(1, self.model_params_after),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": "compress",
            "config": self.config.to_dict(),
            "layers": [r.to_dict() for r in self.layers],
            "totals": self.totals(),
            "seconds": round(self.seconds, 3),
            "units": {"flops": "2 per multiply-add, forward, per token, bias excluded"},
        }


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def compress_(model: nn.Module, config: CompressConfig) -> CompressReport:
    """Factor the target linears of ``model`` in place and report what was done.

    Dense targets become a FactoredLinear of the chosen rank when that saves FLOPs (or with
    ``force``). Targets that are already factored are truncated further when the new rank is
    lower, from their factors alone; otherwise they are left unchanged.
    """
    start = time.perf_counter()
    params_before = _count_params(model)
    reports = []
    for name in select_targets(model, config.targets, config.exclude):
        layer = model.get_submodule(name)
        assert isinstance(layer, (nn.Linear, FactoredLinear))
        new, report = _compress_layer(name, layer, config)
        if new is not layer:
            set_submodule(model, name, new)
        reports.append(report)
    seconds = time.perf_counter() - start
    return CompressReport(config, reports, params_before, _count_params(model), seconds)


def _compress_layer(
    name: str, layer: nn.Linear | FactoredLinear, config: CompressConfig
) -> tuple[nn.Module, LayerReport]:
    """The layer's replacement (or itself) and its report line."""
    o, i, bias = layer.out_features, layer.in_features, layer.bias is not None
    factored_in = isinstance(layer, FactoredLinear)
    spec = layer.spectrum() if isinstance(layer, FactoredLinear) else spectrum(layer.weight)
    if config.rank_ratio is not None:
        rank = rank_by_ratio(o, i, config.rank_ratio)
    else:
        assert config.eps is not None
        rank = rank_by_energy(spec.s, config.eps)

    new: nn.Module = layer
    if isinstance(layer, FactoredLinear):
        before = accounting.factored_params(o, i, layer.rank, bias)
        flops_before = accounting.factored_flops_per_token(o, i, layer.rank)
        if rank < layer.rank:
            new, status = layer.truncated(rank, spec), "factored"
        else:
            rank, status = layer.rank, "unchanged"
    else:
        before = accounting.dense_params(o, i, bias)
        flops_before = accounting.dense_flops_per_token(o, i)
        if saves_flops(o, i, rank) or config.force:
            new, status = FactoredLinear.from_linear(layer, rank, spec), "factored"
        else:
            status = "dense: no saving"
    is_factored = factored_in or status == "factored"
    report = LayerReport(
        name=name,
        out_features=o,
        in_features=i,
        rank=rank,
        full_rank=min(o, i),
        energy=kept_energy(spec, rank),
        params_before=before,
        params_after=accounting.factored_params(o, i, rank, bias) if is_factored else before,
        flops_before=flops_before,
        flops_after=(
            accounting.factored_flops_per_token(o, i, rank) if is_factored else flops_before
        ),
        status=status,
        curve=energy_curve(spec.s).tolist(),
    )
    return new, report
