"""The README's own-loop quickstart runs as printed: the code between its snippet markers,
verbatim, on the tiny sizes it uses (no example batch is passed to ``prepare``)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- --8<-- [start:own-loop] -->", "<!-- --8<-- [end:own-loop] -->"


def own_loop_code() -> str:
    """The python block between the README's own-loop markers (docs/own-loop.md shows the same
    lines through pymdownx.snippets)."""
    text = README.read_text()
    assert text.count(START) == 1 and text.count(END) == 1, "own-loop markers missing"
    section = text[text.index(START) + len(START) : text.index(END)]
    match = re.fullmatch(r"\s*```python\n(.*?)```\s*", section, re.S)
    assert match, "the own-loop section must be exactly one ```python block"
    return match.group(1)


def test_the_own_loop_example_uses_the_one_call_api_without_an_example_batch() -> None:
    code = own_loop_code()
    assert "wasi_tool.prepare(" in code
    assert "example_input" not in code
    assert "loss.backward()" in code and "optimizer.step()" in code
    assert "nn.TransformerEncoder(" in code
    assert len(code.splitlines()) <= 40  # a quickstart, not a program


def test_the_readme_own_loop_example_runs_verbatim(capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": "readme_own_loop"}
    exec(compile(own_loop_code(), str(README), "exec"), namespace)
    model, loss = namespace["model"], namespace["loss"]
    assert isinstance(model, torch.nn.Module) and isinstance(loss, torch.Tensor)
    assert math.isfinite(loss.item())
    report = model.wasi_prepared  # type: ignore[attr-defined]
    assert report.method == "wasi"
    assert sorted(report.targets) == [
        f"encoder.layers.{i}.linear{j}" for i in range(2) for j in (1, 2)
    ]
    from wasi_tool.nn import WASILinear

    for name in report.targets:
        layer = model.get_submodule(name)
        assert isinstance(layer, WASILinear), name
    assert capsys.readouterr().out == ""  # the library prints nothing


def test_the_readme_cli_quickstart_parses_with_the_app() -> None:
    """Every `wasi-tool ...` line of the CLI quickstart names a command and flags the app has
    (parsed by the app itself, not run)."""
    import shlex

    import click
    import typer

    from wasi_tool.cli.app import app

    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    section = README.read_text().split("## Quickstart: the command line", 1)[1]
    section = section.split("\n## ", 1)[0]
    lines = [line.split("#")[0] for line in section.splitlines() if line.startswith("wasi-tool ")]
    assert len(lines) >= 6
    for line in lines:
        name, *args = shlex.split(line)[1:]
        assert name in group.commands, line
        command = group.commands[name]
        parent = click.Context(group, info_name="wasi-tool")
        command.make_context(name, args, parent=parent)  # a bad flag raises click.UsageError
