"""`wasi-tool run`: the stages of a TOML recipe, in order, reusing what has not changed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from wasi_tool.cli import common
from wasi_tool.cli.common import console
from wasi_tool.cli.progress import RichProgress
from wasi_tool.threads import use_threads

if TYPE_CHECKING:
    from wasi_tool.pipeline import StageRecord


def run(
    recipe: Annotated[Path, typer.Argument(help="A pipelines/*.toml recipe.", show_default=False)],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory (default runs/<name>).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a setting: stage.key=value (repeatable)."),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Run every stage even if it could be reused.")
    ] = False,
    threads: common.Threads = None,
) -> None:
    """Run a pipeline recipe: compress, finetune, export, bench and report stages."""
    # Imported here: the pipeline reaches every stage kind, and the CLI's other commands
    # (a training run among them) need none of that at startup.
    from wasi_tool.pipeline import load_pipeline, run_pipeline

    start = time.perf_counter()
    with common.user_errors():
        use_threads(threads)
        pipeline = load_pipeline(recipe, set_ or [])
        run_dir = out or Path("runs") / pipeline.name
        console.print(f"[bold]{pipeline.name}[/bold]: {pipeline.description} -> {run_dir}/")

        def on_stage(rec: StageRecord) -> None:
            how = "reused" if rec.reused else f"ran in {rec.seconds:.1f} s"
            console.print(f"  {rec.name} ({rec.kind}): {how}")

        with RichProgress() as progress:
            records = run_pipeline(
                pipeline, run_dir, force=force, on_stage=on_stage, progress=progress
            )
    table = Table(
        title=f"{pipeline.name}: {len(records)} stages in {time.perf_counter() - start:.1f} s"
    )
    for col in ("stage", "kind", "status", "seconds", "output"):
        table.add_column(col)
    for r in records:
        table.add_row(r.name, r.kind, "reused" if r.reused else "ran", f"{r.seconds:.1f}", r.output)
    console.print(table)
    from rich.markdown import Markdown  # markdown-it and pygments, for the report only

    from wasi_tool.artifact.names import REPORT_MD

    for r in records:
        report = Path(r.output) / REPORT_MD
        if r.kind == "report" and report.is_file():
            console.print(Markdown(report.read_text()))
            console.print(f"report: {report}")
