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
from typing import Any

import torch

from wasi_tool import artifacts
from wasi_tool.allocator import follow_live_memory, in_use
from wasi_tool.data import batch_transform
from wasi_tool.data.text import load_task_data
from wasi_tool.errors import WasiToolError
from wasi_tool.measure import library_floor, reset_peak_rss
from wasi_tool.methods import finalize_, get_method
from wasi_tool.models import hf
from wasi_tool.models.loading import LoadedModel, ModelSource, load_model
from wasi_tool.stages.common import layer_records, write_stage_artifact
from wasi_tool.training import checkpoint
from wasi_tool.training.accounting import LAYERS_NOTE, layer_accounting, model_accounting
from wasi_tool.training.config import FinetuneConfig
from wasi_tool.training.lm import evaluate_lm
from wasi_tool.training.loop import Trainer, first_batch
from wasi_tool.training.plan import parse_size, plan_memory, plan_table
from wasi_tool.training.prepare import calibrated_ranks, prepare_for_training
from wasi_tool.training.progress import Progress, Silent
from wasi_tool.training.results import FinetuneMetrics

__all__ = ["METRICS", "FinetuneConfig", "FinetuneResult", "run_finetune"]

METRICS = "metrics.json"


@dataclass
class FinetuneResult:
    loaded: LoadedModel
    out: Path
    metrics: FinetuneMetrics
    files: dict[str, Any] = field(default_factory=dict)


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
    artifacts.check_output_dir(out, overwrite)
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


def _fit_head(loaded: LoadedModel, classes: int, new_head: bool, progress: Progress) -> None:
    model = loaded.model
    head_classes = getattr(model, "num_classes", None)
    if head_classes != classes or new_head:
        if not hasattr(model, "reset_classifier"):
            raise WasiToolError("the model has no reset_classifier(); cannot fit a new head")
        model.reset_classifier(classes)  # type: ignore[operator]
        progress.note(f"new head: {head_classes} -> {classes} classes")
    loaded.model_kwargs["num_classes"] = classes


def _lm_eval(
    model: torch.nn.Module, test: Any, tokenizer: Any, config: FinetuneConfig, progress: Progress
) -> dict[str, Any]:
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
    torch.manual_seed(config.seed)
    loaded = load_model(source)
    model = loaded.model
    transform = batch_transform(loaded)
    splits = load_task_data(
        loaded,
        data,
        transform.size,
        config.val_fraction,
        config.seed,
        config.classes,
        seq_len=config.seq_len,
    )
    causal = hf.is_causal_lm(model)
    lm_eval: dict[str, Any] | None = None
    if causal:  # next-token prediction keeps its vocabulary head
        tokenizer = hf.load_tokenizer(loaded.tokenizer_dir)
        lm_eval = {"before": _lm_eval(model, splits.test, tokenizer, config, progress)}
    else:
        _fit_head(loaded, splits.num_classes, config.new_head, progress)
    floor = library_floor(model)  # model and data loaded, less the weights

    method = get_method(config.method)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return first_batch(splits.train, config, transform)

    def ranks(targets: list[str]) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
        found, info = calibrated_ranks(model, targets, config, batch)
        if info.get("rule") != "explicit":
            progress.note(f"activation ranks by {info['rule']} on one batch of {info['batch']}")
        return found, info

    prepared = prepare_for_training(model, config, ranks, progress.note)
    plan = None
    if config.memory_budget is not None:
        x, y = batch()
        plan = plan_memory(
            model,
            x,
            y,
            parse_size(config.memory_budget),
            floor=library_floor(model) or 0,  # resident as training starts, less the weights
            momentum=config.momentum,
            lossy=config.lossy,
            plan_ranks=method.compressed_activations and config.act_ranks is None,
        )
        progress.note(plan_table(plan))
        if plan.chosen.act_ranks is not None:  # the plan lowered the calibrated ranks
            prepared.act_ranks = {n: tuple(r) for n, r in plan.chosen.act_ranks.items()}
            prepared.calibration = {**(prepared.calibration or {}), "planned": True}
    trainer = Trainer(
        model,
        prepared.targets,
        config,
        splits.train,
        splits.test,
        transform,
        ckpt_dir,
        progress,
        identity={"arch": loaded.arch, "config": config.to_dict(), "data": str(data)},
    )
    if resume:
        trainer.restore()
    trainer.train()

    model_row = {
        **model_accounting(model),
        **method.model_accounting(model, prepared.plan, lambda: batch()[0]),
    }
    metrics = FinetuneMetrics(
        method=config.method,
        config=config.to_dict(),
        data=splits.description,
        classes=splits.classes,
        targets=prepared.targets,
        weight_ranks={
            n: int(model.get_submodule(n).rank)  # type: ignore[arg-type]
            for n in prepared.targets
            if method.factored_weight
        },
        act_ranks={n: list(r) for n, r in prepared.act_ranks.items()},
        act_calibration=prepared.calibration,
        epochs=trainer.history,
        measured=trainer.measured(floor, allocator),
        analytic={
            "note": LAYERS_NOTE,
            "layers": layer_accounting(
                model, prepared.targets, method, trainer.act_shapes, config.lora_rank
            ),
            "model": model_row,
        },
        bsr=method.plan_record(prepared.plan),
    )
    if plan is not None:
        plan.measured_peak = metrics.measured.peak_rss_bytes
        metrics.memory_plan = plan.to_dict()
    finalize_(model, method)
    model.eval()
    _check_finite(model)
    if lm_eval is not None:
        lm_eval["after"] = _lm_eval(model, splits.test, tokenizer, config, progress)
        metrics.lm = lm_eval
    stages = [{"stage": "finetune", "config": config.to_dict(), "data": splits.description}]
    if prepared.compress_report is not None:
        stages.insert(0, {"stage": "compress", "config": prepared.compress_report["config"]})

    def add_metrics(staging: Path) -> None:
        artifacts.write_json(staging / METRICS, metrics.to_dict())

    as_dict = metrics.to_dict()
    report = {"stage": "finetune", "final": as_dict["final"], "measured": as_dict["measured"]}
    if metrics.lm is not None:
        report["lm"] = metrics.lm
    files = write_stage_artifact(
        loaded,
        out,
        stages,
        layer_records(model, prepared.targets, prepared.act_ranks),
        report,
        extra=add_metrics,
        overwrite=overwrite,
    )
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return FinetuneResult(loaded, out, metrics, files)
