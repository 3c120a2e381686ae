"""Evaluate an artifact (or checkpoint) on a dataset: mean loss and top-1 accuracy, and the
predictions, over the same held-out split that ``finetune`` evaluates on.

The split is a function of the dataset, the validation fraction, the seed and the class subset;
when the model's history has a finetune stage, those default to that stage's, so ``eval`` of a
fine-tuned artifact reads the images it was evaluated on and none it trained on.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import torch

from wasi_tool import artifact
from wasi_tool.artifact import FINETUNE, StageRecord
from wasi_tool.data import batch_transform
from wasi_tool.data.text import load_task_data
from wasi_tool.errors import WasiToolError
from wasi_tool.models.families import task_of
from wasi_tool.models.loading import LoadedModel, ModelSource, load_model
from wasi_tool.training.loop import evaluate

__all__ = ["EvalResult", "run_eval"]

SPLITS = ("test", "train")


class EvalSettings(TypedDict):
    """The split an evaluation read: its settings, and whether they came from the model's
    finetune stage."""

    val_fraction: float
    seed: int
    classes: list[int] | None
    seq_len: int | None
    from_finetune_stage: bool


class EvalDict(TypedDict):
    """``wasi-tool eval --json``."""

    arch: str | None
    data: str
    split: str
    examples: int
    loss: float
    accuracy: float
    classes: list[str]
    settings: EvalSettings
    predictions_file: NotRequired[str]


@dataclass
class EvalResult:
    loaded: LoadedModel
    data: str
    split: str
    examples: int
    loss: float
    accuracy: float
    classes: list[str]
    settings: EvalSettings
    predictions: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def to_dict(self) -> EvalDict:
        return {
            "arch": self.loaded.arch,
            "data": self.data,
            "split": self.split,
            "examples": self.examples,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "classes": self.classes,
            "settings": self.settings,
        }


def _finetune_settings(stages: list[StageRecord]) -> dict[str, Any]:
    for stage in reversed(stages):
        if stage.kind == FINETUNE and stage.config is not None:
            return dict(stage.config)
    return {}


def _write_predictions(path: Path, result: EvalResult, inputs: tuple[Any, ...]) -> None:
    """One CSV row per example, through the output-path rule (never onto an input, a device
    or a FIFO) and an atomic write."""
    names = result.classes
    with artifact.atomic_file(path, inputs, newline="") as f:
        out = csv.writer(f)
        out.writerow(["index", "label", "prediction", "label_name", "prediction_name"])
        for i, (y, p) in enumerate(zip(result.labels, result.predictions, strict=True)):
            out.writerow([i, y, p, names[y], names[p] if p < len(names) else ""])


def run_eval(
    source: ModelSource,
    data: str | Path,
    *,
    split: str = "test",
    batch_size: int = 64,
    classes: list[int] | None = None,
    val_fraction: float | None = None,
    seed: int | None = None,
    seq_len: int | None = None,
    predictions: Path | None = None,
) -> EvalResult:
    """Loss and accuracy of the model ``source`` names on ``split`` of ``data``; with
    ``predictions``, one CSV row per example (classifiers only)."""
    if split not in SPLITS:
        raise WasiToolError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if batch_size < 1:
        raise WasiToolError(f"batch size must be >= 1, got {batch_size}")
    inputs = (source.checkpoint, data)
    if predictions is not None:  # refused before any work when it would overwrite an input
        artifact.check_output_file(predictions, inputs)
    loaded = load_model(source)
    model = loaded.model
    tuned = _finetune_settings(loaded.stages)
    settings: EvalSettings = {
        "val_fraction": tuned.get("val_fraction", 0.1) if val_fraction is None else val_fraction,
        "seed": tuned.get("seed", 0) if seed is None else seed,
        "classes": tuned.get("classes") if classes is None else classes,
        "seq_len": tuned.get("seq_len") if seq_len is None else seq_len,
        "from_finetune_stage": bool(tuned),
    }
    transform = batch_transform(loaded)
    splits = load_task_data(
        loaded,
        data,
        transform.size,
        settings["val_fraction"],
        settings["seed"],
        settings["classes"],
        seq_len=settings["seq_len"],
    )
    causal = task_of(model).next_token
    if predictions is not None and causal:
        raise WasiToolError("--predictions is per example: it applies to classifiers only")
    head = getattr(model, "num_classes", None)
    if not causal and isinstance(head, int) and head != splits.num_classes:
        raise WasiToolError(
            f"the model has {head} classes and {data} has {splits.num_classes}: choose the "
            "classes it was trained on with --classes"
        )
    ds = splits.test if split == "test" else splits.train
    found: list[tuple[torch.Tensor, torch.Tensor]] = []
    figures = evaluate(model, ds, transform, batch_size, predictions=found)
    result = EvalResult(
        loaded,
        splits.description,
        split,
        len(ds),  # type: ignore[arg-type]
        figures["loss"],
        figures["accuracy"],
        splits.classes,
        settings,
    )
    if not causal:
        result.predictions = [int(p) for top1, _ in found for p in top1.tolist()]
        result.labels = [int(y) for _, labels in found for y in labels.tolist()]
    if predictions is not None:
        _write_predictions(predictions, result, inputs)
    return result
