"""The compress stage: load a model, compress_ it, write the artifact."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wasi_tool import artifacts
from wasi_tool.models.loading import LoadedModel, ModelSource, load_model
from wasi_tool.stages.common import layer_records, write_stage_artifact
from wasi_tool.transforms.compress import CompressConfig, CompressReport, compress_

__all__ = ["CompressConfig", "CompressReport", "CompressResult", "compress_", "run_compress"]


@dataclass
class CompressResult:
    """What ``run_compress`` produced."""

    loaded: LoadedModel
    report: CompressReport
    out: Path
    files: dict[str, Any]


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
    artifacts.check_output_dir(out, overwrite)
    loaded = load_model(source)
    report = compress_(loaded.model, config)

    # a re-compress: the energy is of the input artifact's already factored weights
    earlier = any(s.get("stage") == "compress" for s in loaded.stages)
    relative = "already compressed by an earlier stage" if earlier else None

    def add_plot(staging: Path) -> None:
        if plot:
            from wasi_tool.plots import plot_energy

            eps = config.eps if config.rank_ratio is None else None
            plot_energy(report.layers, eps, staging / "energy.png", relative_to=relative)

    files = write_stage_artifact(
        loaded,
        out,
        [{"stage": "compress", "config": config.to_dict()}],
        layer_records(loaded.model, [r.name for r in report.layers]),
        report.to_dict(),
        extra=add_plot,
        overwrite=overwrite,
    )
    return CompressResult(loaded, report, out, files)
