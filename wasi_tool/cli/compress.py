"""`wasi-tool compress`: SVD-factor the target linears of a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from wasi_tool.cli import common
from wasi_tool.cli.common import console, default, human_bytes, human_count
from wasi_tool.cli.defaults import DEFAULT_EPS, CompressConfig  # its defaults, without torch

if TYPE_CHECKING:  # the library (torch) loads when the command runs, not to parse its flags
    from wasi_tool.stages.compress import CompressResult


def compress(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Artifact directory to write.", show_default=False)
    ],
    checkpoint: common.Checkpoint = None,
    arch: common.Arch = None,
    num_classes: common.NumClasses = None,
    img_size: common.ImgSize = None,
    trust_pickle: common.TrustPickle = False,
    random_init: common.RandomInit = False,
    seed_init: common.SeedInit = 0,
    targets: Annotated[
        str, typer.Option(help="mlp | attn | all | comma-separated globs over module names.")
    ] = default(CompressConfig, "targets"),
    exclude: Annotated[
        list[str] | None, typer.Option(help="Globs of module names to keep dense (repeatable).")
    ] = None,
    eps: Annotated[
        float | None,
        typer.Option(
            help=f"Explained variance to keep per layer, in (0, 1] (default {DEFAULT_EPS})."
        ),
    ] = default(CompressConfig, "eps"),
    rank_ratio: Annotated[
        float | None, typer.Option(help="Instead of --eps: rank = ratio * min(O, I).")
    ] = default(CompressConfig, "rank_ratio"),
    force: Annotated[
        bool, typer.Option(help="Factor layers even when the rank saves no FLOPs.")
    ] = default(CompressConfig, "force"),
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    plot: Annotated[
        bool, typer.Option(help="Also write energy.png (energy curves, eps cut).")
    ] = False,
    json_path: common.JsonOut = None,
) -> None:
    """SVD-decompose the target linear layers; rank by explained variance; write an artifact."""
    from wasi_tool.stages.compress import CompressConfig, run_compress

    with common.user_errors(), common.progress_to_stderr(json_path):
        config = CompressConfig(
            targets=targets, exclude=exclude or [], eps=eps, rank_ratio=rank_ratio, force=force
        )
        source = common.model_source(
            checkpoint, arch, num_classes, img_size, trust_pickle, random_init, seed_init
        )
        with common.status("compressing..."):
            result = run_compress(source, config, out, overwrite=overwrite, plot=plot)
        common.write_report_json(json_path, result.out, "report.json")
    if not common.is_stdout(json_path):
        render(result)


def render(result: CompressResult) -> None:
    report = result.report
    rule = (
        f"eps {report.config.eps:g}"
        if report.config.rank_ratio is None
        else (f"rank ratio {report.config.rank_ratio:g}")
    )
    table = Table(title=f"{result.loaded.arch}: {len(report.layers)} target layers, {rule}")
    for col in ("layer", "O x I", "K", "energy", "params", "FLOPs/token", "status"):
        table.add_column(col, justify="left" if col in ("layer", "status") else "right")
    for r in report.layers:
        table.add_row(
            r.name,
            f"{r.out_features} x {r.in_features}",
            f"{r.rank}/{r.full_rank}",
            f"{r.energy:.3f}",
            f"{human_count(r.params_before)} -> {human_count(r.params_after)}",
            f"{human_count(r.flops_before)} -> {human_count(r.flops_after)}",
            r.status,
        )
    t = report.totals()
    table.add_section()
    table.add_row(
        "targets total",
        "",
        "",
        "",
        f"{human_count(t['target_params_before'])} -> {human_count(t['target_params_after'])}",
        f"{human_count(t['target_flops_per_token_before'])} -> "
        f"{human_count(t['target_flops_per_token_after'])}",
        f"{t['factored']}/{t['layers']} factored",
    )
    console.print(table)
    console.print(
        f"compression: targets {t['target_compression']:.2f}x, whole model "
        f"{t['model_compression']:.2f}x ({human_count(t['model_params_before'])} -> "
        f"{human_count(t['model_params_after'])} params); {report.seconds:.1f} s"
    )
    sizes = ", ".join(f"{name} {human_bytes(e['bytes'])}" for name, e in result.files.items())
    console.print(f"wrote {result.out}/ ({sizes}, manifest.json)")
