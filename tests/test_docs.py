"""The docs site builds strictly, and its command reference is the CLI's: every option and
argument of every command of the Typer app appears on the command's built page, with its help.

The reference is generated at build time by docs/_hooks/cli_reference.py; this test reads the
app itself (not the hook), so a flag the hook dropped or a page it did not make fails here.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

import click
import pytest
import typer

from wasi_tool.cli.app import app

ROOT = Path(__file__).resolve().parents[1]


def _text(page: str) -> str:
    """The visible text of a built page's article, whitespace collapsed."""
    body = page[page.find("<article") : page.find("</article>")]
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", body)).split())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")
    out = tmp_path_factory.mktemp("site")
    # strict: a warning (a broken link, a missing page, a bad docstring) aborts the build
    build(load_config(str(ROOT / "mkdocs.yml"), site_dir=str(out), strict=True))
    return out


def _commands() -> list[tuple[str, click.Command]]:
    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    ctx = click.Context(group, info_name="wasi-tool")
    return [(name, group.commands[name]) for name in group.list_commands(ctx)]


@pytest.mark.slow
def test_every_option_of_every_command_is_in_the_built_reference(site: Path) -> None:
    commands = _commands()
    assert {"compress", "finetune", "export", "bench", "run", "eval"} <= dict(commands).keys()
    overview = (site / "commands" / "index.html").read_text()
    checked = 0
    for name, command in commands:
        page_file = site / "commands" / name / "index.html"
        assert page_file.is_file(), f"no page for wasi-tool {name}"
        assert f'href="{name}/"' in overview, f"commands overview does not link {name}"
        page = page_file.read_text()
        text = _text(page)
        assert f"wasi-tool {name}" in text
        for param in command.params:
            if getattr(param, "hidden", False):
                continue
            if isinstance(param, click.Option):
                names = [*param.opts, *param.secondary_opts]
            else:
                names = [param.human_readable_name]
            for opt in names:
                assert f"<code>{html.escape(opt, quote=False)}</code>" in page, (name, opt)
                checked += 1
            help_text = " ".join(str(getattr(param, "help", None) or "").split())
            assert help_text in text, (name, param.name, help_text)
    assert checked > 100  # the app has well over a hundred flags: the loop really ran


@pytest.mark.slow
def test_pages_show_the_readme_example_and_the_plot(site: Path) -> None:
    own = _text((site / "own-loop" / "index.html").read_text())
    readme = (ROOT / "README.md").read_text()
    assert 'method="wasi", targets="*linear1,*linear2", eps=0.9, lr=0.05' in readme
    assert 'method="wasi", targets="*linear1,*linear2", eps=0.9, lr=0.05' in own
    assert (site / "benchmarks" / "results" / "pareto.png").is_file()
    assert "## Reference" not in (site / "commands" / "compress" / "index.html").read_text()


def test_hook_renders_a_table_cell_safely() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "cli_reference", ROOT / "docs" / "_hooks" / "cli_reference.py"
    )
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    cell = hook._cell("globs like *linear1 | root/<class>/*.jpg\n  and `x`")
    assert "|" not in cell.replace("\\|", "")
    assert "<" not in cell and "\n" not in cell
    assert "\\*linear1" in cell
