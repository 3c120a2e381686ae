"""compress_: SVD-factor the target linears of a model in place, rank by explained variance.

torchao-style: a config dataclass plus one function that changes the model in place and
returns its report; the compress stage (stages/compress.py) adds loading and the artifact.

With input Gram matrices (``grams``, from ``wasi_tool.methods.calibrate.calibrate_grams``) each
layer is truncated in the metric of its inputs instead (method.md section 8): the rank-K
factors with the least output error on the calibration data, eps applied to that whitened
spectrum. ``rank_budget`` replaces the per-layer eps by one parameter budget over all targets.
compress_ itself does no I/O: the stage loads the data and computes the grams.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NotRequired, TypedDict

import torch
from torch import nn

from wasi_tool.config import StageConfig, register_config
from wasi_tool.errors import WasiToolError
from wasi_tool.methods.calibrate import InputGram
from wasi_tool.models.targets import check_patterns, select_targets, split_patterns
from wasi_tool.nn.factored import FactoredLinear
from wasi_tool.nn.swap import set_submodule
from wasi_tool.ops import (
    DEFAULT_DAMP,
    DEFAULT_EPS,
    Spectrum,
    Whitening,
    accounting,
    allocate_ranks,
    check_budget,
    check_eps,
    energy_curve,
    kept_energy,
    rank_by_energy,
    rank_by_ratio,
    relative_output_error,
    saves_flops,
    spectrum,
    truncate,
    whitening,
)
from wasi_tool.ops.whiten import (
    check_damp,
    whitened_factored_spectrum,
    whitened_spectrum,
    whitened_truncate,
)

DEFAULT_CALIBRATION_SAMPLES = 256  # N in --calibrate DATA[:N] when no N is given
EPS_SPECTRA = ("weight", "output")  # what eps reads when calibrated (CompressConfig)


def parse_calibration(spec: str) -> tuple[str, int]:
    """(DATA, N) from ``DATA[:N]``: a trailing ``:<integer>`` is the sample count N (default
    DEFAULT_CALIBRATION_SAMPLES). A DATA that itself ends in ``:<number>`` (``emoji-lang:300``)
    needs its N spelled out: ``emoji-lang:300:256``."""
    text = str(spec).strip()
    head, sep, tail = text.rpartition(":")
    if sep and tail.strip().lstrip("+-").isdigit():
        data, count = head.strip(), int(tail)
    else:
        data, count = text, DEFAULT_CALIBRATION_SAMPLES
    if not data:
        raise WasiToolError(f"calibrate needs a data source, DATA[:N], got {spec!r}")
    if count < 1:
        raise WasiToolError(f"calibrate DATA:N needs N >= 1 samples, got {count} in {spec!r}")
    return data, count


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
        calibrate: ``DATA[:N]``: truncate each layer in the metric of its inputs on N samples
            (default 256) of DATA's training split (any finetune data source); held-out samples
            of its test split measure each layer's output error, plain and calibrated.
        calibrate_seed: seeds which N training samples calibrate (and the data's own
            train/test split where it draws one, as finetune's seed does; the same default).
        calibrate_damp: lambda = calibrate_damp * mean diagonal of each input Gram matrix.
        eps_spectrum: with ``calibrate``, the spectrum ``eps`` reads: "weight" (default) the
            weight's own, so the rank is plain SVD's and calibration only makes the truncation
            at that rank lose less output (the same parameters); "output": the whitened
            spectrum (SVD-LLM: eps is a share of the output energy on the calibration data;
            far lower ranks at the same eps, since a few input directions carry most of it).
        rank_budget: instead of eps, one budget for all targets: the factors may hold this
            fraction of the targets' dense weight parameters (sum O*I), ranks chosen to
            remove the most (whitened, when calibrated) truncation error per parameter.
    """

    stage: ClassVar[str] = "compress"

    targets: str = "mlp"
    exclude: list[str] = field(default_factory=list)
    eps: float | None = None
    rank_ratio: float | None = None
    force: bool = False
    calibrate: str | None = None
    calibrate_seed: int = 233  # finetune's default seed, so both see the same train/test split
    calibrate_damp: float = DEFAULT_DAMP
    rank_budget: float | None = None
    eps_spectrum: str = "weight"

    def __post_init__(self) -> None:
        rules = [n for n in ("eps", "rank_ratio", "rank_budget") if getattr(self, n) is not None]
        if len(rules) > 1:
            raise WasiToolError(f"give one rank rule, not both: {' and '.join(rules)}")
        if self.rank_ratio is not None:
            self.rank_ratio = check_eps(self.rank_ratio, "rank_ratio")
        elif self.rank_budget is not None:
            self.rank_budget = check_budget(self.rank_budget, "rank_budget")
        else:
            self.eps = check_eps(DEFAULT_EPS if self.eps is None else self.eps, "eps")
        if self.calibrate is not None:
            parse_calibration(self.calibrate)
        seed = self.calibrate_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise WasiToolError(f"calibrate_seed must be an integer >= 0, got {seed!r}")
        self.calibrate_damp = check_damp(self.calibrate_damp)
        if self.eps_spectrum not in EPS_SPECTRA:
            raise WasiToolError(
                f"eps_spectrum must be one of {', '.join(EPS_SPECTRA)}, got {self.eps_spectrum!r}"
            )

    @property
    def rule(self) -> str:
        """The rank rule in words: ``eps 0.8``, ``rank ratio 0.25`` or ``rank budget 0.4``."""
        if self.rank_ratio is not None:
            return f"rank ratio {self.rank_ratio:g}"
        if self.rank_budget is not None:
            return f"rank budget {self.rank_budget:g}"
        return f"eps {self.eps:g}"
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
    calibrated: bool = False  # truncated in the metric of its inputs; energy is output energy
    damp: float | None = None  # lambda (absolute) of the whitening, when calibrated
    calibration_error: float | None = None  # relative output error on the calibration data
    heldout_plain: float | None = None  # relative held-out output error, plain SVD at rank
    heldout_calibrated: float | None = None  # the same for the calibrated truncation
    curve: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = dataclasses.asdict(self)
        out.pop("curve")
        return out


class RankBudget(TypedDict):
    """What ``rank_budget`` allowed and spent (factor parameters, biases excluded)."""

    fraction: float
    dense_params: int
    allowed_params: int
    used_params: int
    used_fraction: float
    metric: str
    note: str


class CompressTotals(TypedDict):
    """A compress call's totals over its targets and the whole model (``totals``)."""

    layers: int
    factored: int
    target_params_before: int
    target_params_after: int
    target_flops_per_token_before: int
    target_flops_per_token_after: int
    model_params_before: int
    model_params_after: int
    target_compression: float
    model_compression: float
    median_heldout_plain: NotRequired[float]  # with held-out samples
    median_heldout_calibrated: NotRequired[float]


class CompressReportRecord(TypedDict):
    """A compress call's report as JSON (``CompressReport.to_dict``: the stage's report.json,
    and a finetune run's record of the factoring it did)."""

    stage: str
    config: dict[str, Any]  # CompressConfig.to_dict
    layers: list[dict[str, object]]  # LayerReport.to_dict
    totals: CompressTotals
    budget: RankBudget | None
    seconds: float
    units: dict[str, str]


@dataclass
class CompressReport:
    """Per-layer results and totals of one compress call."""

    config: CompressConfig
    layers: list[LayerReport]
    model_params_before: int
    model_params_after: int
    seconds: float
    budget: RankBudget | None = None  # rank_budget: fraction, parameters allowed and used

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

    def totals(self) -> CompressTotals:
        totals: CompressTotals = {
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
        plain = _median(r.heldout_plain for r in self.layers)
        calibrated = _median(r.heldout_calibrated for r in self.layers)
        if plain is not None:
            totals["median_heldout_plain"] = plain
        if calibrated is not None:
            totals["median_heldout_calibrated"] = calibrated
        return totals

    def to_dict(self) -> CompressReportRecord:
        return {
            "stage": "compress",
            "config": self.config.to_dict(),
            "layers": [r.to_dict() for r in self.layers],
            "totals": self.totals(),
            "budget": self.budget,
            "seconds": round(self.seconds, 3),
            "units": {
                "flops": "2 per multiply-add, forward, per token, bias excluded",
                "errors": "relative output error ||X (W - L R)^T||_F / ||X W^T||_F on the "
                "layer's dense-model inputs (calibration or held-out samples)",
            },
        }


def _median(found: Iterable[float | None]) -> float | None:
    """The median of the values that are there (None: none is)."""
    values = sorted(v for v in found if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


GramLike = InputGram | torch.Tensor


def _gram(g: GramLike) -> torch.Tensor:
    return g.matrix if isinstance(g, InputGram) else g


@torch.no_grad()
def compress_(
    model: nn.Module,
    config: CompressConfig,
    grams: Mapping[str, GramLike] | None = None,
    held_out: Mapping[str, GramLike] | None = None,
) -> CompressReport:
    """Factor the target linears of ``model`` in place and report what was done.

    Dense targets become a FactoredLinear of the chosen rank when that saves FLOPs (or with
    ``force``). Targets that are already factored are truncated further when the new rank is
    lower, from their factors alone; otherwise they are left unchanged.

    Args:
        model: changed in place.
        config: targets and the rank rule (eps, rank_ratio or rank_budget).
        grams: per target, its input Gram matrix X^T X on calibration data (an InputGram or an
            I x I tensor; ``calibrate_grams`` computes them): each layer is then truncated in
            the metric of its inputs (L keeps orthonormal columns). Required when
            ``config.calibrate`` is set; without it, plain SVD.
        held_out: per target, the Gram matrix of held-out inputs: each layer's report then
            gives the relative output error on them of plain SVD and (with ``grams``) of the
            calibrated truncation, both at the chosen rank.
    """
    start = time.perf_counter()
    params_before = _count_params(model)
    names = select_targets(model, config.targets, config.exclude)
    if config.calibrate is not None and grams is None:
        raise WasiToolError(
            f"calibrate={config.calibrate!r} needs the targets' input Gram matrices "
            "(wasi_tool.methods.calibrate.calibrate_grams); run_compress computes them"
        )
    for what, given in (("calibration", grams), ("held-out", held_out)):
        missing = [n for n in names if given is not None and n not in given]
        if missing:
            raise WasiToolError(f"no {what} Gram matrix for {', '.join(missing[:3])}")
    whitenings = (
        {n: whitening(_gram(grams[n]), config.calibrate_damp) for n in names}
        if grams is not None
        else {}
    )
    planned: dict[str, int] = {}
    budget = None
    if config.rank_budget is not None:
        planned, budget = _budget_ranks(model, names, config, whitenings)
    reports = []
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, (nn.Linear, FactoredLinear))
        held = _gram(held_out[name]) if held_out is not None else None
        new, report = _compress_layer(
            name, layer, config, whitenings.get(name), held, planned.get(name)
        )
        if new is not layer:
            set_submodule(model, name, new)
        reports.append(report)
    seconds = time.perf_counter() - start
    return CompressReport(
        config, reports, params_before, _count_params(model), seconds, budget=budget
    )


def _spectrum(layer: nn.Linear | FactoredLinear, white: Whitening | None) -> Spectrum:
    """The layer's spectrum: of W, or of W S (whitened) when calibrated."""
    if white is None:
        return layer.spectrum() if isinstance(layer, FactoredLinear) else spectrum(layer.weight)
    if isinstance(layer, FactoredLinear):
        return whitened_factored_spectrum(layer.L, layer.R, white)
    return whitened_spectrum(layer.weight, white)


def _cap(layer: nn.Linear | FactoredLinear, force: bool) -> int:
    """The highest rank compress may give the layer: its current rank when factored, else
    full rank with ``force``, else the largest rank that still saves FLOPs (0: none does)."""
    o, i = layer.out_features, layer.in_features
    if isinstance(layer, FactoredLinear):
        return layer.rank
    if force:
        return min(o, i)
    return min(o, i, math.ceil(o * i / (o + i)) - 1)


def _budget_ranks(
    model: nn.Module,
    names: list[str],
    config: CompressConfig,
    whitenings: Mapping[str, Whitening],
) -> tuple[dict[str, int], RankBudget]:
    """Per-layer ranks under ``config.rank_budget`` (ops.allocate_ranks) and what it spent.

    The budget is rank_budget * sum O*I over the targets that can be factored (the dense
    weight parameters; biases are kept either way and not counted); each rank costs O + I.
    A dense layer that no rank saves FLOPs in (without ``force``) stays dense, outside it.
    """
    assert config.rank_budget is not None
    values: dict[str, torch.Tensor] = {}
    costs: dict[str, int] = {}
    caps: dict[str, int] = {}
    dense = 0
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, (nn.Linear, FactoredLinear))
        cap = _cap(layer, config.force)
        if cap < 1:
            continue
        o, i = layer.out_features, layer.in_features
        values[name] = _spectrum(layer, whitenings.get(name)).s
        costs[name], caps[name] = o + i, cap
        dense += o * i
    allowed = math.floor(config.rank_budget * dense)
    try:
        ranks = allocate_ranks(values, costs, allowed, caps)
    except WasiToolError as exc:
        raise WasiToolError(f"rank_budget {config.rank_budget:g}: {exc}") from None
    used = sum(ranks[n] * costs[n] for n in ranks)
    info: RankBudget = {
        "fraction": config.rank_budget,
        "dense_params": dense,
        "allowed_params": allowed,
        "used_params": used,
        "used_fraction": used / dense if dense else 0.0,
        "metric": "calibrated (output energy)" if whitenings else "plain (weight energy)",
        "note": "factor parameters sum K (O + I) over the budgeted targets, biases excluded; "
        "the allocation is maximal: no layer can take one more rank within the budget",
    }
    return ranks, info


def _compress_layer(
    name: str,
    layer: nn.Linear | FactoredLinear,
    config: CompressConfig,
    white: Whitening | None = None,
    held: torch.Tensor | None = None,
    planned: int | None = None,
) -> tuple[nn.Module, LayerReport]:
    """The layer's replacement (or itself) and its report line."""
    o, i, bias = layer.out_features, layer.in_features, layer.bias is not None
    factored_in = isinstance(layer, FactoredLinear)
    spec = _spectrum(layer, white)
    if planned is not None:
        rank = planned
    elif config.rank_ratio is not None:
        rank = rank_by_ratio(o, i, config.rank_ratio)
    elif config.rank_budget is not None:  # outside the budget: no rank saves FLOPs here
        rank = min(o, i)
    else:
        assert config.eps is not None
        by_weight = white is not None and config.eps_spectrum == "weight"
        rank = rank_by_energy((_spectrum(layer, None) if by_weight else spec).s, config.eps)

    def build(k: int) -> FactoredLinear:
        if white is None:
            return FactoredLinear.from_factors(*truncate(spec, k, _dtype(layer)), layer.bias)
        return FactoredLinear.from_factors(
            *whitened_truncate(spec, white, k, _dtype(layer)), layer.bias
        )

    new: nn.Module = layer
    if isinstance(layer, FactoredLinear):
        before = accounting.factored_params(o, i, layer.rank, bias)
        flops_before = accounting.factored_flops_per_token(o, i, layer.rank)
        if rank < layer.rank:
            new, status = build(rank), "factored"
        else:
            rank, status = layer.rank, "unchanged"
    else:
        before = accounting.dense_params(o, i, bias)
        flops_before = accounting.dense_flops_per_token(o, i)
        if saves_flops(o, i, rank) or config.force:
            new, status = build(rank), "factored"
        else:
            status = "dense: no saving"
    is_factored = factored_in or status == "factored"
    energy = kept_energy(spec, rank)
    heldout_plain = heldout_calibrated = None
    if held is not None:
        weight = _dense(layer)
        plain = spec if white is None else _spectrum(layer, None)
        left, right = truncate(plain, rank, torch.float64)
        heldout_plain = relative_output_error(weight, left @ right, held)
        if white is not None:
            left, right = whitened_truncate(spec, white, rank, torch.float64)
            heldout_calibrated = relative_output_error(weight, left @ right, held)
    report = LayerReport(
        name=name,
        out_features=o,
        in_features=i,
        rank=rank,
        full_rank=min(o, i),
        energy=energy,
        params_before=before,
        params_after=accounting.factored_params(o, i, rank, bias) if is_factored else before,
        flops_before=flops_before,
        flops_after=(
            accounting.factored_flops_per_token(o, i, rank) if is_factored else flops_before
        ),
        status=status,
        calibrated=white is not None,
        damp=white.damp if white is not None else None,
        calibration_error=math.sqrt(max(0.0, 1.0 - energy)) if white is not None else None,
        heldout_plain=heldout_plain,
        heldout_calibrated=heldout_calibrated,
        curve=energy_curve(spec.s).tolist(),
    )
    return new, report


def _dtype(layer: nn.Linear | FactoredLinear) -> torch.dtype:
    return layer.L.dtype if isinstance(layer, FactoredLinear) else layer.weight.dtype


def _dense(layer: nn.Linear | FactoredLinear) -> torch.Tensor:
    """The layer's O x I weight in float64 (L R for a factored layer)."""
    if isinstance(layer, FactoredLinear):
        return layer.L.detach().to(torch.float64) @ layer.R.detach().to(torch.float64)
    return layer.weight.detach().to(torch.float64)
