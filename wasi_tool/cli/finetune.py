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
from wasi_tool.errors import WasiToolError

if TYPE_CHECKING:  # the library (torch) loads when the command runs, not to parse its flags
    from wasi_tool.stages.finetune import FinetuneResult


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise WasiToolError(f"{what} takes comma-separated integers, got {text!r}") from None


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
    seq_len: Annotated[
        int | None, typer.Option(help="causal-lm: tokens per .txt chunk / example (128).")
    ] = default(F, "seq_len"),
    eval_examples: Annotated[
        int, typer.Option(help="causal-lm: held-out prompts scored by exact match.")
    ] = default(F, "eval_examples"),
    targets: Annotated[
        str | None,
        typer.Option(help="Layers the method acts on (default: the factored layers, else mlp)."),
    ] = default(F, "targets"),
    eps: Annotated[
        float, typer.Option(help="Weight rank rule for dense wsi/wasi targets.")
    ] = default(F, "eps"),
    act_ranks: Annotated[
        str | None, typer.Option(help="Activation ranks per mode, e.g. 16,12,32 (B,N,C).")
    ] = None,
    calibrate: Annotated[
        int | None,
        typer.Option(
            help="Factor dense wsi/wasi targets in the metric of their inputs on N training "
            "samples (as compress --calibrate) instead of by plain SVD."
        ),
    ] = default(F, "calibrate"),
    eps_spectrum: Annotated[
        str,
        typer.Option(
            help="With --calibrate, what --eps reads: weight (plain SVD's rank, truncated to "
            "lose less output) or output (the whitened spectrum: far lower ranks)."
        ),
    ] = default(F, "eps_spectrum"),
    act_eps: Annotated[
        float | None, typer.Option(help="Activation ranks by energy on a calibration batch.")
    ] = default(F, "act_eps"),
    act_budget_mb: Annotated[
        float | None, typer.Option(help="Activation ranks minimising gradient error within MiB.")
    ] = default(F, "act_budget_mb"),
    act_order: Annotated[
        str, typer.Option(help="ASI mode order: sequential | parallel.")
    ] = default(F, "act_order"),
    act_residual_rows: Annotated[
        int,
        typer.Option(
            help="asi/wasi: also keep this many sampled residual rows per layer for an "
            "unbiased weight gradient (an experiment; 0: off, docs/unbiased.md)."
        ),
    ] = default(F, "act_residual_rows"),
    update_form: Annotated[str, typer.Option(help="WSI update: projection | paper.")] = default(
        F, "update_form"
    ),
    epochs: Annotated[int, typer.Option()] = default(F, "epochs"),
    batch_size: Annotated[int, typer.Option()] = default(F, "batch_size"),
    lr: Annotated[float, typer.Option()] = default(F, "lr"),
    lr_min: Annotated[float, typer.Option(help="Cosine schedule floor.")] = default(F, "lr_min"),
    momentum: Annotated[float, typer.Option()] = default(F, "momentum"),
    weight_decay: Annotated[float, typer.Option()] = default(F, "weight_decay"),
    clip: Annotated[float, typer.Option(help="Global gradient-norm clip (0: none).")] = default(
        F, "clip"
    ),
    seed: Annotated[int, typer.Option(help="Training seed (data order, heads, bases).")] = default(
        F, "seed"
    ),
    val_fraction: Annotated[
        float, typer.Option(help="Held-out share without a test split.")
    ] = default(F, "val_fraction"),
    classes: Annotated[
        str | None, typer.Option(help="Train on these classes only, e.g. 5,6,7.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Steps per epoch at most.")] = default(
        F, "max_steps"
    ),
    bsr_blocks: Annotated[
        str | None,
        typer.Option(help="bsr: blocks that train, e.g. 3,7,11 (default: scaled to the depth)."),
    ] = None,
    drop_at: Annotated[
        str | None,
        typer.Option(help="bsr: blocks that drop tokens, e.g. 3,6,9 ('' for none)."),
    ] = None,
    keep_rate: Annotated[
        float, typer.Option(help="bsr: share of patch tokens a dropping block keeps.")
    ] = default(F, "keep_rate"),
    fuse: Annotated[
        bool, typer.Option("--fuse/--no-fuse", help="bsr: fuse dropped tokens into one.")
    ] = default(F, "fuse"),
    lora_rank: Annotated[int, typer.Option(help="lora: adapter rank r.")] = default(F, "lora_rank"),
    lora_alpha: Annotated[float, typer.Option(help="lora: scale alpha (alpha / r).")] = default(
        F, "lora_alpha"
    ),
    lora_dropout: Annotated[float, typer.Option(help="lora: adapter dropout.")] = default(
        F, "lora_dropout"
    ),
    lora_recompute: Annotated[
        bool,
        typer.Option(help="lora: recompute x A in backward instead of saving it (exact)."),
    ] = default(F, "lora_recompute"),
    lora_fa_projection: Annotated[
        bool,
        typer.Option(
            "--lora-fa-projection/--no-lora-fa-projection",
            help="lora-fa: project B's gradient by (r/alpha)^2 (A A^T)^-1, as LoRA-FA's "
            "optimiser (off: SGD on B).",
        ),
    ] = default(F, "lora_fa_projection"),
    mezo_mu: Annotated[
        float, typer.Option(help="mezo: perturbation scale mu (lr ~1e-4 without --clip).")
    ] = default(F, "mezo_mu"),
    new_head: Annotated[
        bool, typer.Option(help="A fresh head even when the class count matches (new task).")
    ] = False,
    memory_mode: Annotated[
        str,
        typer.Option(
            help="Recompute instead of save (exact): off | block (keep each block's input) | "
            "mlp | attn (re-run that half of each block)."
        ),
    ] = default(F, "memory_mode"),
    memory_budget: Annotated[
        str | None,
        typer.Option(
            help="Whole-process peak to fit, e.g. 1.2GB: plans the memory mode, or refuses."
        ),
    ] = default(F, "memory_budget"),
    lossy: Annotated[
        str,
        typer.Option(
            help="Lossy storage for backward: off (exact) | bf16 (norm and GELU inputs in "
            "bfloat16; with --memory-budget: allowed to the plan)."
        ),
    ] = default(F, "lossy"),
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
) -> None:
    """Fine-tune with WASI or a baseline (vanilla, asi, wsi, bsr, bsr+wasi, lora, lora-fa,
    mezo, asi-fixed, wasi-fixed); write an artifact and metrics.json."""
    from wasi_tool.stages.finetune import FinetuneConfig, run_finetune
    from wasi_tool.threads import use_threads
    from wasi_tool.training.loop import Interrupted

    with common.user_errors(), common.progress_to_stderr(json_path):
        config = FinetuneConfig.from_flat(
            method=method,
            targets=targets,
            eps=eps,
            act_ranks=_ints(act_ranks, "--act-ranks"),
            calibrate=calibrate,
            eps_spectrum=eps_spectrum,
            act_eps=act_eps,
            act_budget_mb=act_budget_mb,
            act_order=act_order,
            act_residual_rows=act_residual_rows,
            update_form=update_form,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            lr_min=lr_min,
            momentum=momentum,
            weight_decay=weight_decay,
            clip=clip if clip > 0 else None,
            seed=seed,
            val_fraction=val_fraction,
            classes=_ints(classes, "--classes"),
            max_steps=max_steps,
            seq_len=seq_len,
            eval_examples=eval_examples,
            bsr_blocks=_ints(bsr_blocks, "--bsr-blocks"),
            drop_at=_ints(drop_at, "--drop-at"),
            keep_rate=keep_rate,
            fuse=fuse,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            lora_recompute=lora_recompute,
            lora_fa_projection=lora_fa_projection,
            mezo_mu=mezo_mu,
            new_head=new_head,
            memory_mode=memory_mode,
            memory_budget=memory_budget,
            lossy=lossy,
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
        common.write_report_json(json_path, result.out, "metrics.json")
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
