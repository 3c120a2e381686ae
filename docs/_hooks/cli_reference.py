"""MkDocs hook: the command reference, generated from the Typer app at build time.

Every command of ``wasi_tool.cli.app`` gets the page ``commands/<name>.md``: a hand-written
page of that name keeps its prose, and ``<!-- cli-reference -->`` in it (or its end) receives
the generated reference; a command without a page gets a generated one. The nav's "Commands"
section lists the app's commands in the app's order, so a new command appears without editing
mkdocs.yml, and no flag or help text is copied by hand. The PNGs under benchmarks/results/ are
published at the same paths, so the pages can show them without copies.
"""

from __future__ import annotations

import functools
import html
from pathlib import Path
from typing import Any

import click

MARKER = "<!-- cli-reference -->"
COMMANDS_MARKER = "<!-- cli-commands -->"
ROOT = Path(__file__).resolve().parents[2]
IMAGES = "benchmarks/results"


@functools.cache
def cli_group() -> click.Group:
    """The click group behind the Typer app (what ``wasi-tool --help`` shows)."""
    import typer

    from wasi_tool.cli.app import app

    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    return group


@functools.cache
def commands() -> list[tuple[str, click.Command]]:
    group = cli_group()
    ctx = click.Context(group, info_name="wasi-tool")
    return [(name, group.commands[name]) for name in group.list_commands(ctx)]


def _cell(text: object) -> str:
    """Text safe inside a Markdown table cell (no HTML, no emphasis, no column breaks)."""
    out = html.escape(" ".join(str(text).split()), quote=False)
    for ch in "\\*_`|[]":
        out = out.replace(ch, "\\" + ch)
    return out


def _code(text: str) -> str:
    return f"`{text}`" if "`" not in text else f"`` {text} ``"


def _help(param: click.Parameter) -> str:
    return str(getattr(param, "help", None) or "")


def _default(param: click.Parameter, ctx: click.Context) -> str:
    if param.required:
        return "required"
    if isinstance(param, click.Option) and param.is_flag and param.secondary_opts:
        return "on" if param.default else "off"
    if param.default is None or param.default == () or param.default == []:
        return ""
    if isinstance(param, click.Option) and param.is_flag:
        return _code(param.opts[-1]) if param.default else ""
    return _code(str(param.default))


def _type(param: click.Parameter, ctx: click.Context) -> str:
    if isinstance(param, click.Option) and param.is_flag:
        return "flag"
    name = getattr(param.type, "name", "") or ""
    choices = getattr(param.type, "choices", None)
    if choices:
        return " \\| ".join(_code(str(c)) for c in choices)
    text = name.upper() if name else ""
    if getattr(param, "multiple", False) or param.nargs == -1:
        text += " (repeatable)"
    return _cell(text)


def render(name: str, command: click.Command) -> str:
    """The reference of one command: usage, its help, its arguments and options."""
    ctx = click.Context(
        command, info_name=name, parent=click.Context(cli_group(), info_name="wasi-tool")
    )
    usage = " ".join(["wasi-tool", name, *command.collect_usage_pieces(ctx)])
    lines = ["## Reference", "", "Generated from the command itself at build time.", ""]
    lines += ["```text", usage, "```", ""]
    if command.help:
        lines += [" ".join(command.help.split()), ""]
    visible = [p for p in command.params if not getattr(p, "hidden", False)]
    arguments = [p for p in visible if isinstance(p, click.Argument)]
    options = [p for p in visible if isinstance(p, click.Option)]
    if arguments:
        lines += ["| argument | type | default | help |", "| --- | --- | --- | --- |"]
        for p in arguments:
            label = _code(p.human_readable_name)
            lines.append(f"| {label} | {_type(p, ctx)} | {_default(p, ctx)} | {_cell(_help(p))} |")
        lines.append("")
    if options:
        lines += ["| option | type | default | help |", "| --- | --- | --- | --- |"]
        for p in options:
            assert isinstance(p, click.Option)
            label = " / ".join(_code(o) for o in [*p.opts, *p.secondary_opts])
            lines.append(f"| {label} | {_type(p, ctx)} | {_default(p, ctx)} | {_cell(_help(p))} |")
        lines.append("")
    return "\n".join(lines)


def command_table() -> str:
    lines = ["| command | what it does |", "| --- | --- |"]
    for name, command in commands():
        short = command.get_short_help_str(limit=200)
        lines.append(f"| [`{name}`]({name}.md) | {_cell(short)} |")
    return "\n".join(lines) + "\n"


# ---- mkdocs events ---------------------------------------------------------------------------


def on_config(config: Any) -> Any:
    """Fill the nav's "Commands" section with the app's commands, in the app's order."""
    for item in config.nav or []:
        if isinstance(item, dict) and "Commands" in item:
            section = [e for e in item["Commands"] if not _is_command_page(e)]
            section += [{f"wasi-tool {n}": f"commands/{n}.md"} for n, _ in commands()]
            item["Commands"] = section
    return config


def _is_command_page(entry: object) -> bool:
    path = next(iter(entry.values())) if isinstance(entry, dict) else entry
    return isinstance(path, str) and path.startswith("commands/") and path != "commands/index.md"


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for name, command in commands():
        uri = f"commands/{name}.md"
        if files.get_file_from_path(uri) is None:
            help_text = " ".join((command.help or "").split())
            content = f"# wasi-tool {name}\n\n{help_text}\n\n{MARKER}\n"
            files.append(File.generated(config, uri, content=content))
    for png in sorted((ROOT / IMAGES).glob("*.png")):
        uri = f"{IMAGES}/{png.name}"
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    uri = page.file.src_uri
    if uri == "commands/index.md":
        return markdown.replace(COMMANDS_MARKER, command_table())
    if uri.startswith("commands/"):
        name = uri.removeprefix("commands/").removesuffix(".md")
        found = dict(commands()).get(name)
        if found is not None:
            reference = render(name, found)
            if MARKER in markdown:
                return markdown.replace(MARKER, reference)
            return markdown.rstrip() + "\n\n" + reference + "\n"
    return markdown
