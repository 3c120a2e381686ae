"""The finetune stage: train a model with one of the registered methods on an offline dataset.

Reads a checkpoint or artifact, fits the head to the data, prepares the model for the method
(wasi_tool.training.prepare), trains with the paper's recipe by default (SGD momentum 0,
weight decay 1e-4, cosine to lr_min, global-norm clip 2.0; wasi_tool.training.loop), and
writes an artifact plus metrics.json. This module is I/O and orchestration only.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from wasi_tool import artifact
from wasi_tool.allocator import follow_live_memory, in_use
from wasi_tool.artifact import COMPRESS, FINETUNE, METRICS, FileEntry, StageRecord
from wasi_tool.data.datasets import DataSplits
from wasi_tool.errors import WasiToolError
from wasi_tool.measure import reset_peak_rss
from wasi_tool.methods import LoraOptions, finalize_
from wasi_tool.methods.options import options_of
from wasi_tool.models.families import task_of
from wasi_tool.models.hf import load_tokenizer
from wasi_tool.models.loading import LoadedModel, ModelSource
from wasi_tool.stages.common import layer_records, write_stage_artifact
from wasi_tool.training import checkpoint
from wasi_tool.training.accounting import LAYERS_NOTE, layer_accounting, model_accounting
from wasi_tool.training.config import FinetuneConfig
from wasi_tool.training.lm import evaluate_lm
from wasi_tool.training.loop import Trainer
from wasi_tool.training.match import training_memory_of
from wasi_tool.training.progress import Progress, Silent
from wasi_tool.training.results import FinetuneMetrics, LMEvalRecord, LMRecord, ModelRow
from wasi_tool.training.session import Session, build_session

__all__ = ["METRICS", "FinetuneConfig", "FinetuneResult", "run_finetune"]


@dataclass
class FinetuneResult:
    loaded: LoadedModel
    out: Path
    metrics: FinetuneMetrics
    files: dict[str, FileEntry] = field(default_factory=dict)


def _check_outputs(out: Path, ckpt_dir: Path, overwrite: bool, resume: bool) -> None:
    if resume and overwrite:
        raise WasiToolError("--resume continues a run; --overwrite starts it again: pick one")
    if resume:
        if out.exists():
            raise WasiToolError(f"output {out} already exists: that run has finished")
        if (ckpt_dir.exists() or ckpt_dir.is_symlink()) and not checkpoint.is_checkpoint_dir(
            ckpt_dir
        ):
            raise WasiToolError(
                f"{ckpt_dir} is not a wasi-tool checkpoint (it holds other files, or is a link "
                "or a file); refusing to resume from it"
            )
        return
    artifact.check_output_dir(out, overwrite)
    if ckpt_dir.exists() or ckpt_dir.is_symlink():
        if not overwrite:
            raise WasiToolError(
                f"an interrupted run left {ckpt_dir}; pass --resume to continue it or "
                "--overwrite to start again"
            )
        checkpoint.remove_checkpoint_dir(ckpt_dir)


def _check_finite(model: torch.nn.Module) -> None:
    """The weights about to be written are all finite (a merge of finite factors could still
    overflow); otherwise nothing is written."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WasiToolError(
                f"training diverged: the final weight {name} is not finite; nothing was written"
            )


def _lm_eval(
    model: torch.nn.Module, test: Any, tokenizer: Any, config: FinetuneConfig, progress: Progress
) -> LMEvalRecord:
    found = evaluate_lm(model, test, tokenizer, config.batch_size, config.eval_examples)
    em = "" if found.exact_match is None else f", exact match {found.exact_match:.3f}"
    progress.note(f"held-out perplexity {found.perplexity:.3f}{em} ({found.seconds:.1f} s)")
    return found.to_dict()


def run_finetune(
    source: ModelSource,
    data: str | Path,
    config: FinetuneConfig,
    out: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Fine-tune and write an artifact (weights, manifest, report, metrics) at ``out``.

    Each epoch's state goes to ``<out>.ckpt/last.pt`` (atomically); ``resume`` continues from
    it. The checkpoint directory is removed once the artifact is written.
    """
    out = Path(out)
    progress = progress or Silent()
    ckpt_dir = checkpoint.checkpoint_dir(out)
    _check_outputs(out, ckpt_dir, overwrite, resume)

    reset_peak_rss()  # this stage's own peak, when a `run` process ran stages before it
    # resident memory follows live memory (what the plan predicts) when the run saves memory
    saves_memory = (
        config.memory_mode != "off" or config.memory_budget is not None or config.lossy != "off"
    )
    allocator = follow_live_memory() if saves_memory else in_use()
    lm_eval: LMRecord = {}
    tokenizer: Any = None

    def perplexity_before(loaded: LoadedModel, splits: DataSplits) -> None:
        nonlocal tokenizer
        if task_of(loaded.model).next_token:
            tokenizer = load_tokenizer(loaded.tokenizer_dir)
            lm_eval["before"] = _lm_eval(loaded.model, splits.test, tokenizer, config, progress)

    session = build_session(
        source, data, config, before_prepare=perplexity_before, note=progress.note
    )
    loaded, splits, model, prepared = (
        session.loaded,
        session.splits,
        session.model,
        session.prepared,
    )
    assert loaded is not None and splits is not None
    asked = config  # method "auto": the session's config names the method it chose
    config = session.config
    trainer = Trainer(
        model,
        prepared.targets,
        config,
        splits.train,
        splits.test,
        session.transform,
        ckpt_dir,
        progress,
        identity={"arch": loaded.arch, "config": asked.to_dict(), "data": str(data)},
        method=session.method,
        optimizer=session.optimizer,
    )
    if resume:
        trainer.restore()
    trainer.train()
    metrics = _metrics(session, trainer, allocator)
    finalize_(model, session.method)
    model.eval()
    _check_finite(model)
    if lm_eval:
        lm_eval["after"] = _lm_eval(model, splits.test, tokenizer, config, progress)
        metrics.lm = lm_eval
    files = _write_artifact(session, metrics, out, overwrite)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return FinetuneResult(loaded, out, metrics, files)


def _metrics(session: Session, trainer: Trainer, allocator: str | None) -> FinetuneMetrics:
    """What the run measured and decided, before the model goes back to plain modules."""
    model, method, config, prepared = (
        session.model,
        session.method,
        session.config,
        session.prepared,
    )
    assert session.splits is not None
    extra = method.model_accounting(model, prepared.plan, lambda: session.batch()[0])
    model_row = cast(ModelRow, {**model_accounting(model), **extra})  # ModelRow's keys
    metrics = FinetuneMetrics(
        method=config.method,
        config=config.to_dict(),
        data=session.splits.description,
        classes=session.splits.classes,
        targets=prepared.targets,
        weight_ranks={
            n: int(model.get_submodule(n).rank)  # type: ignore[arg-type]
            for n in prepared.targets
            if method.factored_weight
        },
        act_ranks={n: list(r) for n, r in prepared.act_ranks.items()},
        act_calibration=prepared.calibration,
        epochs=trainer.history,
        measured=trainer.measured(session.floor, allocator),
        analytic={
            "note": LAYERS_NOTE,
            "layers": layer_accounting(
                model,
                prepared.targets,
                method,
                trainer.act_shapes,
                options_of(config, LoraOptions).rank,
            ),
            "model": model_row,
        },
        bsr=method.plan_record(prepared.plan),
    )
    if session.plan is not None:
        session.plan.measured_peak = metrics.measured.peak_rss_bytes
        metrics.memory_plan = session.plan.to_dict()
    if session.match is not None:  # the training memory the run measured, beside its target
        metrics.match_memory = session.match.to_dict(run_bytes=training_memory_of(metrics))
    return metrics


def _write_artifact(
    session: Session, metrics: FinetuneMetrics, out: Path, overwrite: bool
) -> dict[str, FileEntry]:
    """The fine-tuned model (plain modules), its stage records, report and metrics.json."""
    loaded, splits, prepared = session.loaded, session.splits, session.prepared
    assert loaded is not None and splits is not None
    config = session.config
    stages = [StageRecord(FINETUNE, config.to_dict(), data=splits.description)]
    if prepared.compress_report is not None:
        stages.insert(0, StageRecord(COMPRESS, prepared.compress_report["config"]))

    def add_metrics(staging: Path) -> None:
        artifact.write_json(staging / METRICS, metrics.to_dict())

    as_dict = metrics.to_dict()
    report = {"stage": FINETUNE, "final": as_dict["final"], "measured": as_dict["measured"]}
    if metrics.lm is not None:
        report["lm"] = metrics.lm
    return write_stage_artifact(
        loaded,
        out,
        stages,
        layer_records(session.model, prepared.targets, prepared.act_ranks),
        report,
        extra=add_metrics,
        overwrite=overwrite,
    )
