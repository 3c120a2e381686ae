"""The `wasi-tool` Typer application."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

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

# click's classes as typer uses them (typer >= 0.21 vendors its own click: a context or
# formatter from the click package would not be the one its commands run)
_ClickContext = TyperCommand.context_class


class _PlainHelpFormatter(_ClickContext.formatter_class):  # type: ignore[name-defined]
    """click's own help layout. Typer escapes "[required]" and "[default: ...]" for rich even
    when rich does not render them; the escape is taken back here."""

    def write_dl(
        self, rows: Iterable[tuple[str, str]], col_max: int = 30, col_spacing: int = 2
    ) -> None:
        super().write_dl(
            [(term, text.replace("\\[", "[")) for term, text in rows], col_max, col_spacing
        )


class _Context(_ClickContext):  # type: ignore[misc,valid-type]
    formatter_class = _PlainHelpFormatter


class _Command(TyperCommand):
    context_class = _Context


class _Group(TyperGroup):
    context_class = _Context


# Help is click's plain layout, not rich's panels: rendering finetune's ~80 options as a rich
# table took 0.25 s of the 0.6 s `wasi-tool finetune --help` cost on a quiet machine (issue 34).
app = typer.Typer(
    name="wasi-tool",
    cls=_Group,
    rich_markup_mode=None,
    help="Fine-tune pretrained transformers on edge CPUs with a fraction of the memory.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=True,
)
app.command(cls=_Command)(compress)
app.command(cls=_Command)(finetune)
app.command(cls=_Command)(export)
app.command(cls=_Command)(bench)
app.command(cls=_Command)(run)
app.command(cls=_Command)(generate)
app.command(cls=_Command)(federate)
app.command(cls=_Command)(info)
app.command("eval", cls=_Command)(evaluate)
app.command(cls=_Command)(doctor)


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
