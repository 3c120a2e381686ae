"""Planning a training step to a memory budget (the whole process's peak RSS).

The plan predicts, per component: the library floor (measured: resident with the model and data
loaded, less the weights), the weights, the gradients (trainable ordinary parameters; WASI
layers hold factors, not a dense gradient), the optimiser state (momentum buffers), the
activations saved for backward (per block), and the largest transient of the step (what the
step's live tensors reach beyond the saved activations and the gradients).

Saved activations and the step's live-tensor peak are measured by two probe steps at B/8 and
B/4 (forward and backward, no update; every layer's state restored) and extrapolated linearly
to the run's batch B: activations are linear in the batch, weights and gradients are not. The plan
then takes the least recompute (off, attn, mlp, block) whose prediction fits within a margin
of the budget that depends on the allocator (``margin``): the prediction counts live tensors,
and an allocator keeps some freed memory resident beyond them; when none fits, a
WasiToolError names the minimum and its largest parts. When the user allows lossy storage
(``lossy="bf16"``), each mode but block is also tried with it, right after the same mode exact:
the user who allows it prefers a faster step to an exact one.

Activation ranks (asi, wasi) are the method's own choice (calibrated by energy) as long as a
plan fits with them. When none does and the ranks were not given explicitly
(``plan_ranks``), the planner takes, for each candidate in order, the room the budget leaves
for the targets' compressed activations and lets the gradient-error DP
(``methods.calibrate.ranks_under_budget``) pick per-layer ranks within it; the first such plan
whose re-probed prediction fits is chosen ("planned act ranks"). Lower ranks change the
gradient (more of it is lost), which is why they come last, after every exact option.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch
from torch import nn

from wasi_tool.allocator import in_use, release_free_memory
from wasi_tool.errors import WasiToolError
from wasi_tool.measure import LiveTensorMeter, SavedBytesMeter, peak_rss_bytes
from wasi_tool.models.families import family_of
from wasi_tool.nn.recompute import recomputed
from wasi_tool.nn.subspace import SubspaceLayer, WASILinear
from wasi_tool.training.loss import task_loss
from wasi_tool.training.memory import apply_memory_mode_, probe_steps

MODES = ("off", "attn", "mlp", "block")  # least recompute first
MARGIN = 0.05  # a plan fits when its predicted peak is within 95% of the budget (glibc)
# tcmalloc and jemalloc keep freed memory resident beyond the live tensors the plan counts.
# Measured peak over predicted, ViT-B/32 wasi (all), batch 32, budgets 1.2 and 1.5 GB
# (benchmarks/memory_budget.py, BENCHMARKS.md memory_floor): jemalloc 1.04-1.06x; tcmalloc
# 1.05-1.15x (2026-12-08: 1.5 GB went over by 4 MB at a 5% margin once the floor fell). The
# margin covers the largest: 1 - 1 / 1.155 = 0.134 -> 0.14; jemalloc 1 - 1 / 1.06 -> 0.06.
ALLOCATOR_MARGIN = {"tcmalloc": 0.14, "jemalloc": 0.06}
GB = 1e9


def margin(allocator: str | None = None) -> float:
    """The share of the budget a plan leaves free on ``allocator`` (default: the one this
    process runs on, ``wasi_tool.allocator.in_use``)."""
    return ALLOCATOR_MARGIN.get(allocator or in_use(), MARGIN)


def parse_size(text: str | float) -> int:
    """``"1.2GB"``, ``"800MB"``, ``"1.5G"`` or a number of bytes -> bytes (decimal units)."""
    if isinstance(text, (int, float)):
        return int(text)
    units = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}
    s = str(text).strip().upper()
    number = s.rstrip("KMGB")
    unit = s[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise WasiToolError(f"memory budget {text!r}: give a size like 1.2GB or 800MB") from None
    if not value > 0:
        raise WasiToolError(f"memory budget must be positive, got {text!r}")
    return int(value)


class AutoTry(TypedDict, total=False):
    """One candidate ``method="auto"`` tried: whether its plan fits, and how or why not."""

    method: str
    fits: bool
    memory_mode: str
    why: str


class AutoRecord(TypedDict):
    """What ``method="auto"`` tried, in its order, and why it chose the method it did."""

    order: list[str]
    tried: list[AutoTry]
    why: str


class MemoryPlanRecord(TypedDict, total=False):
    """A memory plan as metrics.json and the bench records keep it (``MemoryPlan.to_dict``):
    the budget and batch, the chosen mode and its predicted (and, after the run, measured)
    peak, every candidate's prediction (``Prediction.to_dict``: its parts and peak)."""

    budget_bytes: int
    batch_size: int
    probe_batch: int
    memory_mode: str
    lossy: str
    act_ranks_planned: bool
    gradient_error: float
    predicted_peak_bytes: int
    measured_peak_bytes: int | None
    chosen: dict[str, object]
    candidates: list[dict[str, object]]
    note: str
    method: str
    auto: AutoRecord
    measured_over_predicted: float


@dataclass
class Prediction:
    """Predicted bytes of each component at one memory mode."""

    memory_mode: str
    floor: int
    weights: int
    gradients: int
    optimizer_state: int
    saved_activations: int
    transient: int
    load_peak: int  # what the process already reached while loading and preparing
    saved_per_block: dict[str, int] = field(default_factory=dict)
    lossy: str = "off"
    saved_in_targets: int = 0  # of saved_activations: what the target layers keep
    act_ranks: dict[str, list[int]] | None = None  # set when the planner chose the ranks
    # relative weight-gradient error of the compressed activations on the probe batch
    # (||dY^T (A - A~)|| / ||dY^T A|| over all targets, A~ the truncated HOSVD at the plan's
    # ranks: the fidelity benchmark's measure); 0.0: exact gradients (nothing compressed)
    gradient_error: float = 0.0
    # wall time of the larger probe step (forward + backward at the probe batch): what this
    # plan's recompute and compression cost in time, next to the others' on the same batch
    probe_seconds: float = 0.0

    @property
    def label(self) -> str:
        label = self.memory_mode if self.lossy == "off" else f"{self.memory_mode} + {self.lossy}"
        return f"{label}, planned act ranks" if self.act_ranks is not None else label

    @property
    def step(self) -> int:
        """The step's predicted peak without the load peak."""
        return (
            self.floor
            + self.weights
            + self.gradients
            + self.optimizer_state
            + self.saved_activations
            + self.transient
        )

    @property
    def peak(self) -> int:
        return max(self.step, self.load_peak)

    def parts(self) -> dict[str, int]:
        return {
            "library floor": self.floor,
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer state": self.optimizer_state,
            "saved activations": self.saved_activations,
            "transient of backward": self.transient,
        }

    def to_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "peak": self.peak}


@dataclass
class MemoryPlan:
    """The chosen memory mode, every candidate's prediction, and the budget. ``method`` is
    the method planned; ``auto`` says, for ``method="auto"``, what was tried and why this
    one was chosen."""

    budget: int
    chosen: Prediction
    candidates: list[Prediction]
    batch_size: int
    measured_peak: int | None = None
    method: str | None = None
    auto: AutoRecord | None = None
    probe_batch: int = 0  # the batch of the probe step each candidate's probe_seconds times

    def to_dict(self) -> MemoryPlanRecord:
        out: MemoryPlanRecord = {
            "budget_bytes": self.budget,
            "batch_size": self.batch_size,
            "probe_batch": self.probe_batch,
            "memory_mode": self.chosen.memory_mode,
            "lossy": self.chosen.lossy,
            "act_ranks_planned": self.chosen.act_ranks is not None,
            "gradient_error": self.chosen.gradient_error,
            "predicted_peak_bytes": self.chosen.peak,
            "measured_peak_bytes": self.measured_peak,
            "chosen": self.chosen.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "note": "saved activations and the transient: probe steps at B/8 and B/4, "
            "extrapolated linearly to the batch; floor: resident with model and data loaded, "
            "less the weights; peak: the largest of the step's sum and the load peak",
        }
        if self.method is not None:
            out["method"] = self.method
        if self.auto is not None:
            out["auto"] = self.auto
        if self.measured_peak is not None:
            out["measured_over_predicted"] = self.measured_peak / self.chosen.peak
        return out


class BudgetNotMet(WasiToolError):
    """No plan of this method fits the memory budget (``method="auto"`` tries the next)."""


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _gradient_bytes(model: nn.Module) -> int:
    """Gradients a step keeps: ordinary trainable parameters, and each WASI layer's pending
    factor P (O x r); the factors L and R never get a .grad."""
    factors = {id(p) for m in model.modules() if isinstance(m, WASILinear) for p in (m.L, m.R)}
    ordinary = [p for p in model.parameters() if p.requires_grad and id(p) not in factors]
    return _tensor_bytes(ordinary)


def _probe(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, blocks: list[str], targets: list[str]
) -> tuple[int, int, dict[str, int], int]:
    """(saved bytes, live-tensor peak, saved bytes per block, saved in the targets) of one
    forward + backward."""
    meter = SavedBytesMeter(model, targets=targets, regions=blocks)
    try:
        with LiveTensorMeter() as live:
            with meter:
                loss = task_loss(model(x), y)
            loss.backward()
            del loss
    finally:
        meter.remove()
    return meter.total, live.peak, dict(meter.by_region), meter.targets


def plan_memory(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    budget: int,
    *,
    floor: int,
    momentum: float = 0.0,
    modes: tuple[str, ...] = MODES,
    lossy: str = "off",
    plan_ranks: bool = False,
) -> MemoryPlan:
    """Choose the least recompute that fits ``budget`` for a step on batch ``x``, ``y``.

    ``model`` is the prepared training model (memory mode off); it leaves with the chosen
    regions recomputing (and, if ``lossy`` allows it and the plan takes it, lossy storage; if
    ``plan_ranks`` allows it and nothing else fits, planned activation ranks), its parameters,
    gradients and layer states as they were.
    """
    batch = int(x.shape[0])
    if batch < 2:
        raise WasiToolError("a memory budget needs a batch size of at least 2")
    # two probe batches, small next to the run's, large enough that every rank is reached
    small = max(1, batch // 8)
    sizes = (small, min(batch, 2 * small)) if batch >= 4 else (1, 2)
    family = family_of(model)
    blocks = family.blocks(model)
    targets = [n for n, m in model.named_modules() if isinstance(m, SubspaceLayer)]
    weights = _tensor_bytes(t for t in model.state_dict().values() if isinstance(t, torch.Tensor))
    grads = _gradient_bytes(model)
    opt_state = grads if momentum else 0
    calibrated = _act_ranks(model)
    candidates: list[Prediction] = []
    options = [
        (mode, kind)
        for mode in modes
        for kind in dict.fromkeys(("off", lossy))
        if kind == "off" or mode != "block"  # a recomputed block stores nothing lossily
    ]
    share = 1 - margin()
    limit = budget * share

    def predict(mode: str, kind: str, ranks: dict[str, list[int]] | None) -> Prediction | None:
        # what earlier probes freed goes back first: a probe's peak is its own, not a
        # larger candidate's retained by the allocator
        release_free_memory()
        _apply(model, family, blocks, mode, kind)
        if mode != "off" and not recomputed(model):
            return None  # this model has no such regions
        probes = []
        for b in sizes:
            _clear_gradients(model)
            start = time.perf_counter()
            probes.append(_probe(model, x[:b], y[:b], blocks, targets))
            seconds = time.perf_counter() - start  # the last (larger) probe's is kept
        (s1, l1, per1, t1), (s2, l2, per2, t2) = probes
        scale = (batch - sizes[0]) / (sizes[1] - sizes[0])
        saved = int(s1 + (s2 - s1) * scale)
        live = int(l1 + (l2 - l1) * scale)
        per_block = {k: int(per1.get(k, 0) + (v - per1.get(k, 0)) * scale) for k, v in per2.items()}
        transient = max(0, live - saved - grads)
        return Prediction(
            mode,
            floor,
            weights,
            grads,
            opt_state,
            saved,
            transient,
            peak_rss_bytes(),
            per_block,
            kind,
            saved_in_targets=int(t1 + (t2 - t1) * scale),
            act_ranks=ranks,
            probe_seconds=seconds,
        )

    errors: dict[tuple[Any, ...], float] = {}

    def error_of(ranks: dict[str, list[int]] | None) -> float:
        use = ranks if ranks is not None else calibrated
        if not use:
            return 0.0  # nothing compressed: the gradient is exact
        key = tuple(sorted((n, tuple(r)) for n, r in use.items()))
        if key not in errors:
            release_free_memory()
            _apply(model, family, blocks, modes[-1], "off")  # the least held while it probes
            errors[key] = plan_gradient_error(
                model, x[: sizes[1]], y[: sizes[1]], use, batch, passes=max(1, len(blocks))
            )
        return errors[key]

    chosen: Prediction | None = None
    try:
        with probe_steps(model):  # layers, gradients, mode and random stream come back
            model.train()
            for mode, kind in options:
                found = predict(mode, kind, None)
                if found is not None:
                    candidates.append(found)
            for c in candidates:
                c.gradient_error = error_of(None)
            chosen = next((c for c in candidates if c.peak <= limit), None)
            if chosen is None and plan_ranks and calibrated:
                for base in list(candidates):
                    room = int(limit - (base.step - base.saved_in_targets))
                    if base.load_peak > limit or base.saved_in_targets == 0 or room <= 0:
                        continue
                    ranks = _ranks_within(model, family, blocks, targets, x, y, room, modes[-1])
                    if ranks is None:
                        continue
                    _set_act_ranks(model, ranks)
                    found = predict(base.memory_mode, base.lossy, ranks)
                    _set_act_ranks(model, calibrated)
                    if found is not None:
                        found.gradient_error = error_of(ranks)
                        candidates.append(found)
                        if found.peak <= limit:
                            chosen = found
                            break
    finally:
        _apply(model, family, blocks, "off", "off")
    if chosen is None:
        best = min(candidates, key=lambda c: c.peak)
        largest = sorted(best.parts().items(), key=lambda kv: -kv[1])[:3]
        parts = ", ".join(f"{k} {v / GB:.2f} GB" for k, v in largest)
        raise BudgetNotMet(
            f"memory budget {budget / GB:.2f} GB cannot be met (plans fit {share:.0%} of it "
            f"on {in_use()}): the least "
            f"this run can reach is "
            f"{best.peak / GB:.2f} GB (memory mode {best.label}; largest parts: {parts}), "
            f"so the least budget it plans for is {best.peak / share / GB:.2f} GB"
        )
    if chosen.act_ranks is not None:
        _set_act_ranks(model, chosen.act_ranks)
    _apply(model, family, blocks, chosen.memory_mode, chosen.lossy)
    return MemoryPlan(budget, chosen, candidates, batch, probe_batch=sizes[1])


def plan_gradient_error(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    ranks: dict[str, list[int]],
    batch: int,
    passes: int = 1,
) -> float:
    """Relative weight-gradient error of compressing the targets' activations at ``ranks``:
    ||dY^T (A - A~)||_F / ||dY^T A||_F summed over the targets, A~ the truncated HOSVD of the
    input A at the ranks, on ``x`` (a probe batch of the run's first batch: the batch mode's
    rank is scaled to its size, ``rank * len(x) / batch``). The fidelity benchmark's measure;
    it does not depend on the memory mode (recompute is exact), so the model's recompute
    regions stay active while it runs, and each layer's error is taken as its gradient
    arrives (``stream_gradients``, in ``passes`` runs of consecutive targets): the probe
    holds about what a probe step of the same batch holds."""
    from wasi_tool.methods.calibrate import gradient_error, spectra, stream_gradients

    scale = len(x) / batch
    sums = [0.0, 0.0]  # squared error, squared reference

    def add(name: str, a: torch.Tensor, dy: torch.Tensor) -> None:
        r = [max(1, round(ranks[name][0] * scale)), *ranks[name][1:]]
        sums[0] += gradient_error(a, dy, spectra(a), r) ** 2
        dw = dy.to(torch.float64).reshape(-1, dy.shape[-1]).T @ a.to(torch.float64).reshape(
            -1, a.shape[-1]
        )
        sums[1] += float(torch.linalg.matrix_norm(dw)) ** 2

    stream_gradients(model, list(ranks), x, y, task_loss, add, passes)
    _clear_gradients(model)
    err_sq, ref_sq = sums
    return (err_sq / ref_sq) ** 0.5 if ref_sq > 0 else 0.0


def _clear_gradients(model: nn.Module) -> None:
    """No gradient left from a probe: ``.grad`` and the subspace layers' pending gradient
    factors (a WASI layer's sink concatenates each backward's factors until the step: left
    there, each probe carried the earlier probes' factors, 19 MB a probe at ViT-B/32's shapes,
    and the extrapolated transient of backward grew with them)."""
    model.zero_grad(set_to_none=True)
    for m in model.modules():
        if isinstance(m, SubspaceLayer):
            m.discard_pending()


def _act_ranks(model: nn.Module) -> dict[str, list[int]]:
    """Each subspace layer's activation ranks (layers that compress their input)."""
    found = {}
    for n, m in model.named_modules():
        act = getattr(m, "act", None) if isinstance(m, SubspaceLayer) else None
        if act is not None:
            found[n] = list(act.ranks)
    return found


def _set_act_ranks(model: nn.Module, ranks: dict[str, list[int]]) -> None:
    """Give layers new activation ranks; a basis of another shape starts afresh (seeded)."""
    for name, r in ranks.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, SubspaceLayer)
        layer.set_act_ranks(r)


def _ranks_within(
    model: nn.Module,
    family: Any,
    blocks: list[str],
    targets: list[str],
    x: torch.Tensor,
    y: torch.Tensor,
    room: int,
    mode: str,
) -> dict[str, list[int]] | None:
    """Per-layer ranks whose compressed activations fit ``room`` bytes at batch ``x``, with
    the least summed gradient error (the DP of methods.calibrate), or None when even the
    lowest candidate does not fit. The DP counts cores and bases in float32; 10% is kept back
    for what a layer keeps beside them. Each layer's options are taken as its gradient
    arrives, with ``mode``'s regions recomputing, one block's targets a pass (no more held
    than a step in that mode)."""
    from wasi_tool.methods.calibrate import (
        MB,
        LayerOptions,
        choose_under_budget,
        layer_options,
        stream_gradients,
    )

    names = [n for n in targets if getattr(model.get_submodule(n), "act", None) is not None]
    release_free_memory()
    _apply(model, family, blocks, mode, "off")
    options: dict[str, LayerOptions] = {}
    stream_gradients(
        model,
        names,
        x,
        y,
        task_loss,
        lambda n, a, dy: options.__setitem__(n, layer_options(a, dy)),
        passes=max(1, len(blocks)),
    )
    _clear_gradients(model)
    if set(options) != set(names):
        return None  # a layer no gradient reached: no plan of ranks for it
    try:
        choice = choose_under_budget({n: options[n] for n in names}, 0.9 * room / MB)
    except WasiToolError:
        return None
    return {n: list(r) for n, r in choice.ranks.items()}


def _apply(model: nn.Module, family: Any, blocks: list[str], mode: str, lossy: str) -> None:
    """The planner's candidate ``mode`` and ``lossy`` on ``model`` (prepare's own function)."""
    apply_memory_mode_(model, mode, lossy, strict=False)


def plan_table(plan: MemoryPlan) -> str:
    """The plan as a plain-text table: each candidate's predicted parts and peak."""
    modes = [c.label for c in plan.candidates]
    rows = [("component", *modes)]
    for part in plan.chosen.parts():
        rows.append((part, *(f"{c.parts()[part] / 1e6:.0f} MB" for c in plan.candidates)))
    rows.append(("load peak", *(f"{c.load_peak / 1e6:.0f} MB" for c in plan.candidates)))
    rows.append(("predicted peak", *(f"{c.peak / 1e6:.0f} MB" for c in plan.candidates)))
    rows.append(("gradient error", *(_error_text(c.gradient_error) for c in plan.candidates)))
    if plan.probe_batch:  # one timing each, on a shared machine: a guide, not a benchmark
        first = plan.candidates[0].probe_seconds or 1.0
        rows.append(
            (
                f"probe step (batch {plan.probe_batch})",
                *(
                    f"{c.probe_seconds * 1e3:.0f} ms ({c.probe_seconds / first:.2f}x)"
                    for c in plan.candidates
                ),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    what = f"{plan.method}, " if plan.method else ""
    head = (
        f"memory plan for a {plan.budget / 1e9:.2f} GB budget at batch {plan.batch_size}: "
        f"{what}memory mode {plan.chosen.label} (predicted peak {plan.chosen.peak / 1e9:.2f} GB)"
    )
    return "\n".join([head, *lines])


def _error_text(error: float) -> str:
    return "0 (exact)" if error == 0 else f"{error:.3f}"
