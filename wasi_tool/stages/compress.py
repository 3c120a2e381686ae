"""The compress stage: load a model, compress_ it, write the artifact.

With ``calibrate``, the stage also loads the data, draws N calibration samples from its
training split and as many held-out samples from its test split, and streams each target's
input Gram matrix over both (``calibrate_grams``); compress_ truncates in the calibration
metric and reports the held-out output error of plain and calibrated truncation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from wasi_tool import artifact
from wasi_tool.artifact import COMPRESS, FileEntry, StageRecord
from wasi_tool.artifact.records import CalibrationRecord
from wasi_tool.data import batch_transform
from wasi_tool.data.text import load_task_data
from wasi_tool.errors import WasiToolError
from wasi_tool.methods.calibrate import Batch, InputGram, calibrate_grams, row_mask
from wasi_tool.models.loading import LoadedModel, ModelSource, load_model
from wasi_tool.models.targets import select_targets
from wasi_tool.stages.common import layer_records, write_stage_artifact
from wasi_tool.training.loss import IGNORE
from wasi_tool.transforms.compress import (
    CompressConfig,
    CompressReport,
    compress_,
    parse_calibration,
)

__all__ = [
    "Calibration",
    "CompressConfig",
    "CompressReport",
    "CompressResult",
    "calibration_grams",
    "compress_",
    "run_compress",
]

CALIBRATION_BATCH = 32  # samples per forward pass while the Gram matrices accumulate


@dataclass
class Calibration:
    """The Gram matrices of one calibration, and how they were made (for the artifact)."""

    grams: dict[str, InputGram]
    held_out: dict[str, InputGram]
    record: CalibrationRecord


@dataclass
class CompressResult:
    """What ``run_compress`` produced."""

    loaded: LoadedModel
    report: CompressReport
    out: Path
    files: dict[str, FileEntry]
    calibration: CalibrationRecord | None = None


def _batches(
    loaded: LoadedModel, dataset: Dataset[Any], indices: Sequence[int], transform: Any
) -> Iterator[Batch]:
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=CALIBRATION_BATCH)
    for x, y in loader:
        x = transform(x)
        yield x, row_mask(loaded.model, x, y, IGNORE)


def calibration_grams(
    loaded: LoadedModel, config: CompressConfig, names: Sequence[str]
) -> Calibration:
    """The targets' input Gram matrices on ``config.calibrate``'s data, in the dense model.

    N samples of the training split (a permutation seeded by ``calibrate_seed``, which also
    seeds the data's own train/test split where it has one) calibrate; min(N, test size)
    samples of the test split are held out to measure the output error.
    """
    assert config.calibrate is not None
    data, count = parse_calibration(config.calibrate)
    transform = batch_transform(loaded)
    seed = config.calibrate_seed
    splits = load_task_data(loaded, data, transform.size, seed=seed)
    n_train, n_test = len(splits.train), len(splits.test)  # type: ignore[arg-type]
    if count > n_train:
        raise WasiToolError(
            f"calibrate {config.calibrate}: {count} samples asked, the training split of "
            f"{data} has {n_train}"
        )
    gen = torch.Generator().manual_seed(seed)
    train_idx = torch.randperm(n_train, generator=gen)[:count].tolist()
    held = min(count, n_test)
    test_idx = torch.randperm(n_test, generator=gen)[:held].tolist()
    grams = calibrate_grams(
        loaded.model, names, _batches(loaded, splits.train, train_idx, transform)
    )
    held_out = calibrate_grams(
        loaded.model, names, _batches(loaded, splits.test, test_idx, transform)
    )
    record: CalibrationRecord = {
        "data": data,
        "description": splits.description,
        "samples": count,
        "split": "train",
        "seed": seed,
        "damp": config.calibrate_damp,
        "rows": grams[names[0]].rows if names else 0,
        "held_out": {"samples": held, "split": "test", "rows": held_out[names[0]].rows}
        if names
        else None,
        "inputs": "each target's inputs in the dense model (before any layer is truncated)",
    }
    return Calibration(grams, held_out, record)


def run_compress(
    source: ModelSource,
    config: CompressConfig,
    out: Path,
    *,
    overwrite: bool = False,
    plot: bool = False,
) -> CompressResult:
    """Load a model, compress it, and write an artifact directory at ``out`` (atomically)."""
    out = Path(out)
    artifact.check_output_dir(out, overwrite)
    loaded = load_model(source)
    calibration = None
    if config.calibrate is not None:
        names = select_targets(loaded.model, config.targets, config.exclude)
        calibration = calibration_grams(loaded, config, names)
        report = compress_(loaded.model, config, calibration.grams, calibration.held_out)
    else:
        report = compress_(loaded.model, config)

    # a re-compress: the energy is of the input artifact's already factored weights
    earlier = any(s.kind == COMPRESS for s in loaded.stages)
    relative = "already compressed by an earlier stage" if earlier else None

    def add_plot(staging: Path) -> None:
        if plot:
            from wasi_tool.plots import plot_energy

            eps = config.eps if config.rank_ratio is None else None
            plot_energy(report.layers, eps, staging / artifact.ENERGY_PLOT, relative_to=relative)

    stage = StageRecord(
        COMPRESS,
        config.to_dict(),
        calibration=calibration.record if calibration is not None else None,
        budget=report.budget,
    )
    layers = [
        dataclasses.replace(
            row,
            heldout_error={"plain": r.heldout_plain, "calibrated": r.heldout_calibrated},
        )
        if r.heldout_plain is not None
        else row
        for row, r in zip(
            layer_records(loaded.model, [r.name for r in report.layers]), report.layers, strict=True
        )
    ]
    files = write_stage_artifact(
        loaded,
        out,
        [stage],
        layers,
        {**report.to_dict(), "calibration": calibration.record if calibration else None},
        extra=add_plot,
        overwrite=overwrite,
    )
    return CompressResult(
        loaded, report, out, files, calibration.record if calibration is not None else None
    )
