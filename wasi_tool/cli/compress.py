"""`wasi-tool compress`: SVD-factor the target linears of a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from wasi_tool.cli import common
from wasi_tool.cli.common import console, default, human_bytes, human_count
from wasi_tool.cli.defaults import (  # its defaults, without torch
    DEFAULT_CALIBRATION_SAMPLES,
    DEFAULT_EPS,
    CompressConfig,
)

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
    calibrate: Annotated[
        str | None,
        typer.Option(
            help="DATA[:N]: truncate each layer in the metric of its inputs on N training "
            f"samples of DATA (any --data source of finetune; N default "
            f"{DEFAULT_CALIBRATION_SAMPLES}); the table adds held-out output errors, plain "
            "and calibrated. A DATA ending in :number needs its N: emoji-lang:300:256.",
            show_default=False,
        ),
    ] = default(CompressConfig, "calibrate"),
    calibrate_seed: Annotated[
        int, typer.Option(help="Seed of the calibration samples (and of the data's split).")
    ] = default(CompressConfig, "calibrate_seed"),
    calibrate_damp: Annotated[
        float, typer.Option(help="Whitening damping: lambda = damp * mean diagonal of X^T X.")
    ] = default(CompressConfig, "calibrate_damp"),
    eps_spectrum: Annotated[
        str,
        typer.Option(
            help="With --calibrate, what --eps reads: weight (the rank plain SVD picks; "
            "calibration makes it lose less output) or output (the whitened spectrum, "
            "SVD-LLM's: a share of the output energy; far lower ranks)."
        ),
    ] = default(CompressConfig, "eps_spectrum"),
    rank_budget: Annotated[
        float | None,
        typer.Option(
            help="Instead of --eps: the factors hold this fraction, in (0, 1], of the targets' "
            "dense weight parameters; ranks chosen across layers to lose the least "
            "(calibrated, with --calibrate) truncation error.",
            show_default=False,
        ),
    ] = default(CompressConfig, "rank_budget"),
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
            targets=targets,
            exclude=exclude or [],
            eps=eps,
            rank_ratio=rank_ratio,
            force=force,
            calibrate=calibrate,
            calibrate_seed=calibrate_seed,
            calibrate_damp=calibrate_damp,
            eps_spectrum=eps_spectrum,
            rank_budget=rank_budget,
        )
        source = common.model_source(
            checkpoint, arch, num_classes, img_size, trust_pickle, random_init, seed_init
        )
        what = "calibrating and compressing..." if calibrate else "compressing..."
        with common.status(what):
            result = run_compress(source, config, out, overwrite=overwrite, plot=plot)
        from wasi_tool.artifact.names import REPORT

        common.write_report_json(json_path, result.out, REPORT)
    if not common.is_stdout(json_path):
        render(result)


def _error(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def render(result: CompressResult) -> None:
    report = result.report
    rule = report.config.rule
    cal = result.calibration
    if cal is not None:
        rule += f", calibrated on {cal['samples']} samples of {cal['data']}"
    held = any(r.heldout_plain is not None for r in report.layers)
    table = Table(title=f"{result.loaded.arch}: {len(report.layers)} target layers, {rule}")
    columns = ["layer", "O x I", "K", "energy", "params", "FLOPs/token"]
    if held:
        columns += ["held-out err plain", "calibrated"]
    for col in (*columns, "status"):
        table.add_column(col, justify="left" if col in ("layer", "status") else "right")
    for r in report.layers:
        errors = [_error(r.heldout_plain), _error(r.heldout_calibrated)] if held else []
        table.add_row(
            r.name,
            f"{r.out_features} x {r.in_features}",
            f"{r.rank}/{r.full_rank}",
            f"{r.energy:.3f}",
            f"{human_count(r.params_before)} -> {human_count(r.params_after)}",
            f"{human_count(r.flops_before)} -> {human_count(r.flops_after)}",
            *errors,
            r.status,
        )
    t = report.totals()
    table.add_section()
    medians = (
        [_error(t.get("median_heldout_plain")), _error(t.get("median_heldout_calibrated"))]
        if held
        else []
    )
    table.add_row(
        "targets total" + (" (median errors)" if held else ""),
        "",
        "",
        "",
        f"{human_count(t['target_params_before'])} -> {human_count(t['target_params_after'])}",
        f"{human_count(t['target_flops_per_token_before'])} -> "
        f"{human_count(t['target_flops_per_token_after'])}",
        *medians,
        f"{t['factored']}/{t['layers']} factored",
    )
    console.print(table)
    if held:
        energy = "output energy on the calibration data" if cal else "weight energy"
        console.print(
            "energy: "
            + energy
            + "; held-out err: ||X_h (W - LR)^T|| / ||X_h W^T|| at the chosen K, on "
            + (f"{cal['held_out']['samples']} test samples" if cal and cal["held_out"] else "")
        )
    if report.budget is not None:
        b = report.budget
        console.print(
            f"rank budget {b['fraction']:g}: {human_count(b['used_params'])} of "
            f"{human_count(b['allowed_params'])} factor parameters allowed "
            f"({b['used_fraction']:.3f} of the targets' dense {human_count(b['dense_params'])})"
        )
    console.print(
        f"compression: targets {t['target_compression']:.2f}x, whole model "
        f"{t['model_compression']:.2f}x ({human_count(t['model_params_before'])} -> "
        f"{human_count(t['model_params_after'])} params); {report.seconds:.1f} s"
    )
    sizes = ", ".join(f"{name} {human_bytes(e['bytes'])}" for name, e in result.files.items())
    console.print(f"wrote {result.out}/ ({sizes}, manifest.json)")
