"""Typed results of a training run, with a schema version: what metrics.json holds.

``FinetuneMetrics.to_dict`` writes the JSON (same keys as before, plus ``schema``);
``from_dict`` reads it back and refuses another schema, so readers (the CLI, the pipeline
report, the benchmarks) use attributes, not string keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

from wasi_tool.artifact.names import METRICS as METRICS  # a finetune artifact's FinetuneMetrics
from wasi_tool.errors import WasiToolError

if TYPE_CHECKING:
    from wasi_tool.training.accounting import LayerAccounting
    from wasi_tool.training.plan import MemoryPlanRecord

FINETUNE_SCHEMA = "wasi-tool-finetune-metrics/2"
SAVED_NOTE = (
    "storages autograd saved for backward in one step, each once, parameters excluded "
    "(saved_tensors_hooks)"
)
RSS_NOTE = (
    "whole process, its own address space (VmHWM, restarted when the stage starts, so in a "
    "`run` earlier stages count only with what they left resident): loading, data, training "
    "and evaluation; floor_rss_bytes: resident size with the model loaded, less its weights"
)


class ActRankRecord(TypedDict, total=False):
    """How a run's activation ranks were chosen (``act_calibration``): the rule ("explicit",
    "per layer", "calibrated by <file>", "B/4, N/4, 32", "eps", "budget") and what it used:
    its act_eps, or its budget and what the dynamic programme spent; the calibration batch
    and its time; ``when`` (on the first training batch, without an example); ``matched``
    (chosen by match_memory); ``planned`` (lowered by the memory plan)."""

    rule: str
    act_eps: float
    budget_mib: float
    memory_mib: float
    summed_gradient_error: float
    eps_per_layer: dict[str, float]
    batch: int | None
    seconds: float
    when: str
    matched: bool
    planned: bool  # the memory plan lowered the calibrated ranks to fit its budget


class ModelRow(TypedDict, total=False):
    """Whole-model figures (``analytic.model``): training.accounting.ModelAccounting's, and
    the method's own (BSR: tokens per block, the blocks that save activations)."""

    parameters: int
    trainable_parameters: int
    gradient_elements: int
    note: str
    tokens_per_block: list[int]
    blocks_saving_activations: list[int]
    convention: str


class Analytic(TypedDict):
    """Analytic figures (``analytic``): per target layer and step, and the whole model."""

    note: str
    layers: list[LayerAccounting]
    model: ModelRow


class LMEvalRecord(TypedDict):
    """A causal LM's held-out figures at one point (``training.lm.LMEval``)."""

    loss: float
    perplexity: float
    token_accuracy: float
    exact_match: float | None
    exact_match_count: int
    samples: list[dict[str, str]]  # prompt, generated, reference
    seconds: float


class LMRecord(TypedDict, total=False):
    """A causal LM's held-out evaluation (``lm``), before and after training."""

    before: LMEvalRecord
    after: LMEvalRecord


class MatchMemoryRecord(TypedDict, total=False):
    """What match_memory chose (``match_memory``; ``training.match.MatchRecord``): the target
    run, its method and training memory, the setting and its value, the probe's and (at the
    end) the run's measured training memory, and why it stays below when it does."""

    run: str
    run_method: str
    target_bytes: int
    setting: str
    chosen: int | str
    probe_bytes: int
    probe_over_target: float
    note: str
    run_bytes: int
    run_over_target: float


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    lr_end: float
    seconds: float


@dataclass
class SavedBytes:
    """Median bytes saved for backward per step: all of them, and inside the targets."""

    total: float | None
    targets: float | None
    note: str = SAVED_NOTE


@dataclass
class Measured:
    median_step_seconds: float
    images_per_second: float | None
    steps: int
    peak_rss_bytes: int
    saved_bytes_per_step: SavedBytes
    peak_rss_note: str = RSS_NOTE
    floor_rss_bytes: int | None = None  # resident with the model loaded, less its weights
    allocator: str | None = None  # what the process ran on (wasi_tool/allocator.py)
    p10_step_seconds: float | None = None  # the spread beside the median
    p90_step_seconds: float | None = None


@dataclass
class FinetuneMetrics:
    """Everything a fine-tuning run measured and decided (metrics.json)."""

    method: str
    config: dict[str, Any]
    data: str
    classes: list[str]
    targets: list[str]
    weight_ranks: dict[str, int]
    act_ranks: dict[str, list[int]]
    act_calibration: ActRankRecord | None
    epochs: list[EpochRecord]
    measured: Measured
    analytic: Analytic
    bsr: dict[str, Any] | None = None  # the method's plan record (BSRPlan.to_dict)
    memory_plan: MemoryPlanRecord | None = None  # training.plan.MemoryPlan.to_dict
    lm: LMRecord | None = None  # causal LM: held-out evaluation before and after
    match_memory: MatchMemoryRecord | None = None  # training.match.MatchRecord.to_dict
    schema: str = field(default=FINETUNE_SCHEMA)

    @property
    def final(self) -> EpochRecord | None:
        return self.epochs[-1] if self.epochs else None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["final"] = dataclasses.asdict(self.final) if self.final else None
        for key in ("bsr", "memory_plan", "lm", "match_memory"):
            if out[key] is None:
                out.pop(key)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneMetrics:
        if data.get("schema") != FINETUNE_SCHEMA:
            raise WasiToolError(
                f"metrics schema {data.get('schema')!r} is not {FINETUNE_SCHEMA!r}: "
                "made by another wasi-tool version"
            )
        try:
            meas = dict(data["measured"])
            meas["saved_bytes_per_step"] = SavedBytes(**meas["saved_bytes_per_step"])
            fields = {f.name for f in dataclasses.fields(cls)}
            kwargs = {k: v for k, v in data.items() if k in fields}
            kwargs["epochs"] = [EpochRecord(**e) for e in data["epochs"]]
            kwargs["measured"] = Measured(**meas)
            return cls(**kwargs)
        except (KeyError, TypeError) as exc:
            raise WasiToolError(f"malformed metrics: {exc}") from None
