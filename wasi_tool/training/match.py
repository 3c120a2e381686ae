"""Iso-memory runs: choose a method's memory setting to match another run's training memory.

``finetune --match-memory RUN`` reads RUN's measured training memory (metrics.json: the bytes
saved for backward per step, plus every weight and one gradient per trainable parameter, 4
bytes each: the BSR paper's convention, and the x axis of the accuracy benchmark) and chooses
this run's setting that comes closest to it without going over:

- methods that compress activations (asi, wasi, bsr+wasi, the fixed-subspace variants): the
  per-layer activation ranks, by the least summed gradient error within the room the target
  leaves once the step's other bytes are paid (``methods.calibrate.ranks_under_budget``, the
  rule of ``act_budget_mb``), re-measured and tightened until the measured memory is within it;
- adapter methods (lora, lora-fa): the LoRA rank. Their memory is affine in the rank (adapter
  weights, gradients and, for plain LoRA, the saved ``x A^T``), so two probes give the line and
  a third checks the chosen rank.

Each probe is one forward and backward on the run's first batch, measured the way the training
loop measures a step (``SavedBytesMeter``); the model's parameters, gradients, layer states and
the random stream are left as they were. Methods with no such setting (vanilla, wsi, bsr, mezo)
are refused with the reason. The result (target, chosen setting, probe's memory) goes to
metrics.json under ``match_memory``; the run's own measured memory is added when it ends.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.methods.lora import LoraOptions
from wasi_tool.methods.options import options_of
from wasi_tool.training.accounting import model_accounting
from wasi_tool.training.memory import probe_steps
from wasi_tool.training.results import ActRankRecord, MatchMemoryRecord

if TYPE_CHECKING:
    from wasi_tool.training.config import FinetuneConfig

Batch = Callable[[], tuple[torch.Tensor, torch.Tensor]]
MB = 1024 * 1024
TIGHTEN = 6  # re-measurements of the activation ranks before giving up


def training_memory_of(metrics: Any) -> int:
    """A finished run's training memory (bytes) from its ``FinetuneMetrics``."""
    saved = metrics.measured.saved_bytes_per_step.total
    model = metrics.analytic.get("model", {}) if isinstance(metrics.analytic, dict) else {}
    if saved is None or "parameters" not in model or "gradient_elements" not in model:
        raise WasiToolError("the run's metrics have no measured saved bytes or parameter counts")
    return int(saved + 4 * (model["parameters"] + model["gradient_elements"]))


@dataclass(frozen=True)
class MatchTarget:
    run: str
    bytes: int
    method: str
    batch_size: int | None


def read_target(run: str | Path) -> MatchTarget:
    """The training memory a finished finetune run measured (its directory, or its
    metrics.json)."""
    from wasi_tool.safe_read import read_json
    from wasi_tool.training.results import METRICS, FinetuneMetrics

    path = Path(run)
    file = path / METRICS if path.is_dir() else path
    if not file.is_file():
        raise WasiToolError(f"match_memory: {run} is not a finished finetune run (no {METRICS})")
    data = read_json(file, f"match_memory: {file}")
    if not isinstance(data, dict):
        raise WasiToolError(f"match_memory: {file} is not a metrics object")
    metrics = FinetuneMetrics.from_dict(data)
    batch = metrics.config.get("batch_size") if isinstance(metrics.config, dict) else None
    return MatchTarget(str(run), training_memory_of(metrics), metrics.method, batch)


def probe_memory(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, targets: list[str]
) -> tuple[int, int]:
    """(training memory, bytes saved inside ``targets``) of one step of the prepared ``model``
    on ``x``, ``y``: the bytes saved in the forward, metered as the training loop meters them
    (the loss outside), plus weights and one gradient per trainable parameter (fp32). Leaves
    the model and the random stream as they were."""
    from wasi_tool.measure import SavedBytesMeter
    from wasi_tool.training.loss import task_loss

    meter = SavedBytesMeter(model, targets)
    try:
        with probe_steps(model):
            model.train()
            model.zero_grad(set_to_none=True)
            with meter:
                logits = model(x)
            task_loss(logits, y).backward()
            del logits
    finally:
        meter.remove()
    counts = model_accounting(model)
    return meter.total + 4 * (counts["parameters"] + counts["gradient_elements"]), meter.targets


@dataclass(frozen=True)
class MatchRecord:
    """What match_memory chose: the target run, its method and training memory, the setting
    chosen (``act_ranks``: "per layer", or ``lora_rank``: the rank), the memory its probe
    measured, and why it stays below the target when it does (``note``)."""

    run: str
    run_method: str
    target_bytes: int
    setting: str
    chosen: int | str
    probe_bytes: int
    note: str | None = None

    @property
    def probe_over_target(self) -> float:
        return self.probe_bytes / self.target_bytes

    def to_dict(self, run_bytes: int | None = None) -> MatchMemoryRecord:
        """The metrics.json record (``match_memory``), with the run's own measured training
        memory when it is known."""
        out: MatchMemoryRecord = {
            "run": self.run,
            "run_method": self.run_method,
            "target_bytes": self.target_bytes,
            "setting": self.setting,
            "chosen": self.chosen,
            "probe_bytes": self.probe_bytes,
            "probe_over_target": self.probe_over_target,
        }
        if self.note:
            out["note"] = self.note
        if run_bytes is not None:
            out["run_bytes"] = run_bytes
            out["run_over_target"] = run_bytes / self.target_bytes
        return out


def _record(
    target: MatchTarget, knob: str, chosen: int | str, probe: int, note: str | None = None
) -> MatchRecord:
    return MatchRecord(target.run, target.method, target.bytes, knob, chosen, probe, note)


def match_act_ranks(
    model: nn.Module,
    targets: list[str],
    batch: Batch,
    target: MatchTarget,
) -> tuple[dict[str, tuple[int, ...]], ActRankRecord, MatchRecord]:
    """Activation ranks of the prepared ``model`` whose measured training memory is as close
    to ``target`` as the rank candidates allow, at most it. Sets them on the model; returns
    them, how they were chosen (the calibration record) and the match record."""
    from wasi_tool.methods.calibrate import BUDGET_EPS, capture, ranks_under_budget
    from wasi_tool.training.loss import task_loss
    from wasi_tool.training.plan import _set_act_ranks

    x, y = batch()
    names = [n for n in targets if getattr(model.get_submodule(n), "act", None) is not None]
    if not names:
        raise WasiToolError("match_memory: no target compresses its activations")
    memory, in_targets = probe_memory(model, x, y, targets)
    others = memory - in_targets  # what the ranks do not change
    if others >= target.bytes:
        raise WasiToolError(
            f"match_memory: {target.run}'s training memory is {target.bytes / 1e6:.1f} MB, but "
            f"this run needs {others / 1e6:.1f} MB before any activation of its targets "
            "(weights, gradients, the rest of the saved bytes): choose fewer targets, a memory "
            "mode, or another method"
        )
    with probe_steps(model):
        captured = capture(model, names, x, y, task_loss)
    room = target.bytes - others
    budget = room
    best: tuple[dict[str, tuple[int, ...]], Any, int] | None = None
    for _ in range(TIGHTEN):
        try:
            choice = ranks_under_budget(captured, budget / MB)
        except WasiToolError:
            break  # even the lowest ranks do not fit this budget
        _set_act_ranks(model, {n: list(r) for n, r in choice.ranks.items()})
        memory, in_targets = probe_memory(model, x, y, targets)
        if memory <= target.bytes:
            best = (dict(choice.ranks), choice, memory)
            break
        budget = int(budget * room / max(1, in_targets) * 0.995)  # measured over the DP's count
    if best is None:
        raise WasiToolError(
            f"match_memory: no activation ranks bring this run to {target.bytes / 1e6:.1f} MB "
            f"(the lowest candidates measured {memory / 1e6:.1f} MB)"
        )
    ranks, choice, memory = best
    _set_act_ranks(model, {n: list(r) for n, r in ranks.items()})
    why = None
    if memory < 0.9 * target.bytes and all(e == max(BUDGET_EPS) for e in choice.eps.values()):
        why = (
            f"every layer is at the highest rank candidate (act eps {max(BUDGET_EPS)}), which "
            "needs less than the target: the method compresses activations even with room left"
        )
    info: ActRankRecord = {
        "rule": "budget",
        "budget_mib": budget / MB,
        "memory_mib": choice.memory_mb,
        "summed_gradient_error": choice.error,
        "eps_per_layer": choice.eps,
        "batch": len(y),
        "matched": True,
    }
    return ranks, info, _record(target, "act_ranks", "per layer", memory, why)


def match_lora_rank(
    model: nn.Module,
    config: FinetuneConfig,
    batch: Batch,
    target: MatchTarget,
    prepare: Callable[[nn.Module, FinetuneConfig], list[str]],
) -> tuple[int, MatchRecord]:
    """The largest LoRA rank whose measured training memory is at most ``target``: ``prepare
    (copy, config)`` prepares a copy of the unprepared ``model`` and returns its targets."""
    x, y = batch()
    memo: dict[int, int] = {}

    def measure(rank: int) -> int:
        if rank not in memo:
            trial = copy.deepcopy(model)
            options = dataclasses.replace(options_of(config, LoraOptions), rank=rank)
            names = prepare(trial, dataclasses.replace(config, options=options, match_memory=None))
            memo[rank] = probe_memory(trial, x, y, names)[0]
            del trial
        return memo[rank]

    from wasi_tool.training.prepare import choose_targets

    names = choose_targets(model, config.targets)
    top = min(
        min(int(getattr(model.get_submodule(n), "in_features", 1)),
            int(getattr(model.get_submodule(n), "out_features", 1)))
        for n in names
    )  # fmt: skip
    low = measure(1)
    if low > target.bytes:
        raise WasiToolError(
            f"match_memory: LoRA at rank 1 needs {low / 1e6:.1f} MB, over {target.run}'s "
            f"{target.bytes / 1e6:.1f} MB: choose fewer targets, a memory mode, or another method"
        )
    probe = min(top, 16)
    slope = (measure(probe) - low) / max(1, probe - 1) if probe > 1 else 0.0
    rank = top if slope <= 0 else int(min(top, 1 + (target.bytes - low) // slope))
    rank = max(1, rank)
    while rank > 1 and measure(rank) > target.bytes:
        rank -= 1
    while rank < top and measure(rank + 1) <= target.bytes:  # the line is exact; make sure
        rank += 1
    why = None
    if rank == top and measure(rank) < 0.9 * target.bytes:
        why = f"the LoRA rank is at its largest ({top}, the smallest target's width)"
    return rank, _record(target, "lora_rank", rank, measure(rank), why)
