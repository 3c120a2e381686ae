"""The `wasi-tool` Typer application."""

from __future__ import annotations

from typing import Annotated

import typer

from wasi_tool.cli import common
from wasi_tool.cli.bench import bench
from wasi_tool.cli.compress import compress
from wasi_tool.cli.doctor import doctor
from wasi_tool.cli.export import export
from wasi_tool.cli.federate import federate
from wasi_tool.cli.finetune import finetune
from wasi_tool.cli.generate import generate
from wasi_tool.cli.inspect import evaluate, info
from wasi_tool.cli.run import run
from wasi_tool.threads import WAIT_POLICIES, set_wait_policy

app = typer.Typer(
    name="wasi-tool",
    help="Fine-tune pretrained transformers on edge CPUs with a fraction of the memory.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=True,
)
app.command()(compress)
app.command()(finetune)
app.command()(export)
app.command()(bench)
app.command()(run)
app.command()(generate)
app.command()(federate)
app.command()(info)
app.command("eval")(evaluate)
app.command()(doctor)


def _version(value: bool) -> None:
    if value:
        from wasi_tool._version import __version__  # importlib.metadata: only when asked

        typer.echo(f"wasi-tool {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
    wait_policy: Annotated[
        str,
        typer.Option(
            help=f"What torch's idle threads do ({' | '.join(WAIT_POLICIES)}; sets "
            "OMP_WAIT_POLICY for this run and the processes it starts): passive sleeps, "
            "active spins; auto is your own OMP_WAIT_POLICY, else passive (much faster beside "
            "other busy processes). Give it before the command.",
        ),
    ] = "auto",
) -> None:
    """wasi-tool: compress, fine-tune, export and benchmark transformers for edge CPUs."""
    # Commands import torch in their bodies, after this: the policy is in place when it loads.
    with common.user_errors():
        set_wait_policy(wait_policy)


def main() -> None:
    # before anything can import torch (whose OpenMP runtime reads the policy once, at load)
    set_wait_policy("auto")
    app()
