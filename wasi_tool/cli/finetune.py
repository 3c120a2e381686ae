"""`wasi-tool finetune`: train a checkpoint or artifact with WASI or a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from wasi_tool.cli import common
from wasi_tool.cli.common import console, default, human_bytes
from wasi_tool.cli.defaults import METHOD_NAMES as METHODS
from wasi_tool.cli.defaults import FinetuneConfig as F  # its defaults, without torch
from wasi_tool.cli.progress import RichProgress
from wasi_tool.cli.settings import flat_settings, takes_settings

if TYPE_CHECKING:  # the library (torch) loads when the command runs, not to parse its flags
    from wasi_tool.stages.finetune import FinetuneResult


@takes_settings("FinetuneConfig")
def finetune(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Artifact directory to write.", show_default=False)
    ],
    checkpoint: common.Checkpoint = None,
    data: Annotated[
        str,
        typer.Option(help=common.DATA_HELP),
    ] = "digits",
    method: Annotated[
        str,
        typer.Option(
            help=f"One of: {', '.join(METHODS)}; or auto with --memory-budget: the first of "
            "vanilla, wsi, wasi whose plan fits (exact gradients first), and why."
        ),
    ] = default(F, "method"),
    arch: common.Arch = None,
    num_classes: common.NumClasses = None,
    img_size: common.ImgSize = None,
    trust_pickle: common.TrustPickle = False,
    random_init: common.RandomInit = False,
    seed_init: common.SeedInit = 0,
    task: common.Task = None,
    clip: Annotated[float, typer.Option(help="Global gradient-norm clip (0: none).")] = default(
        F, "clip"
    ),
    match_memory: Annotated[
        str | None,
        typer.Option(
            metavar="RUN",
            help="A finished finetune run: choose the activation ranks (asi, wasi) or LoRA rank "
            "so this run's training memory comes as close to RUN's as it can without going over.",
        ),
    ] = default(F, "match_memory"),
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run from <out>.ckpt/.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace --out (and its checkpoints).")] = False,
    threads: common.Threads = None,
    json_path: common.JsonOut = None,
    **settings: object,
) -> None:
    """Fine-tune with WASI or a baseline (vanilla, asi, wsi, bsr, bsr+wasi, lora, lora-fa,
    mezo, asi-fixed, wasi-fixed); write an artifact and metrics.json. Every FinetuneConfig
    setting is an option (a method's own options too: --lora-rank, --keep-rate, --mezo-mu)."""
    from wasi_tool.stages.finetune import FinetuneConfig, run_finetune
    from wasi_tool.threads import use_threads
    from wasi_tool.training.loop import Interrupted

    with common.user_errors(), common.progress_to_stderr(json_path):
        config = FinetuneConfig.from_flat(
            flat_settings("FinetuneConfig", settings),
            method=method,
            clip=clip if clip > 0 else None,
            match_memory=match_memory,
        )
        use_threads(threads)
        source = common.model_source(
            checkpoint, arch, num_classes, img_size, trust_pickle, random_init, seed_init, task=task
        )
        try:
            with RichProgress() as progress:
                result = run_finetune(
                    source, data, config, out, overwrite=overwrite, resume=resume, progress=progress
                )
        except KeyboardInterrupt as stop:
            # Interrupted says which step was saved; earlier (loading, calibrating) nothing was
            saved = str(stop) if isinstance(stop, Interrupted) else "before training: nothing saved"
            common.err_console.print(f"interrupted: {saved}", markup=False, highlight=False)
            raise typer.Exit(130) from None
        from wasi_tool.artifact.names import METRICS

        common.write_report_json(json_path, result.out, METRICS)
    if not common.is_stdout(json_path):
        render(result)


def render(result: FinetuneResult) -> None:
    m = result.metrics
    measured = m.measured
    table = Table(title=f"{result.loaded.arch}: {m.method} on {m.data}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    accuracy = m.final.test_accuracy if m.final else float("nan")
    if m.lm is not None:
        before, after = m.lm["before"], m.lm["after"]
        table.add_row(
            "held-out perplexity", f"{before['perplexity']:.3f} -> {after['perplexity']:.3f}"
        )
        if after["exact_match"] is not None:
            table.add_row(
                f"exact match ({after['exact_match_count']} held out)",
                f"{before['exact_match']:.3f} -> {after['exact_match']:.3f}",
            )
    else:
        table.add_row("test accuracy", f"{accuracy:.4f}")
    table.add_row("targets", f"{len(m.targets)} layers")
    model = m.analytic["model"]
    table.add_row("trainable parameters", f"{model['trainable_parameters']:,}")
    if m.bsr is not None:
        table.add_row("bsr trained blocks", ", ".join(map(str, m.bsr["trained_blocks"])))
        table.add_row("tokens per block", " ".join(map(str, model["tokens_per_block"])))
    saved = measured.saved_bytes_per_step
    table.add_row("saved for backward / step (all)", human_bytes(saved.total or 0))
    table.add_row("saved for backward / step (targets)", human_bytes(saved.targets or 0))
    table.add_row("median step", f"{measured.median_step_seconds * 1e3:.1f} ms")
    table.add_row("peak RSS (process)", human_bytes(measured.peak_rss_bytes))
    if measured.floor_rss_bytes is not None:
        table.add_row("library floor (model, data loaded)", human_bytes(measured.floor_rss_bytes))
    if measured.allocator is not None:
        table.add_row("allocator", measured.allocator)
    if m.memory_plan is not None:
        plan = m.memory_plan
        planned = plan["memory_mode"]
        if plan.get("lossy", "off") != "off":
            planned += f" + {plan['lossy']}"
        table.add_row("memory mode (planned)", planned)
        table.add_row(
            f"predicted peak (budget {human_bytes(plan['budget_bytes'])})",
            human_bytes(plan["predicted_peak_bytes"]),
        )
    if m.match_memory is not None:
        match = m.match_memory
        table.add_row(
            f"training memory (matched to {human_bytes(match['target_bytes'])})",
            f"{human_bytes(match['run_bytes'])} ({match['run_over_target']:.3f}x)",
        )
        table.add_row(f"matched {match['setting']}", str(match["chosen"]))
    console.print(table)
    if m.lm is not None and m.lm["after"]["samples"]:
        sample = m.lm["after"]["samples"][0]
        console.print(
            f"sample: {sample['prompt']!r} -> {sample['generated']!r} "
            f"(reference {sample['reference']!r})",
            markup=False,
            highlight=False,
        )
    console.print(
        f"wrote {result.out}/ (model.safetensors, manifest.json, report.json, metrics.json)"
    )
