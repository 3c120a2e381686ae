"""Bounded readers for JSON and TOML the tool did not just write (manifests, safetensors
metadata, pipeline.json, recipes, checkpoint sidecars): the size is checked before reading
and the nesting depth before parsing, so a hostile or broken file is one WasiToolError, never
a MemoryError or a RecursionError traceback."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from wasi_tool.errors import WasiToolError

MAX_BYTES = 64 * 1024 * 1024  # far above any manifest, recipe or metadata the tool writes
MAX_DEPTH = 64  # the tool's own files nest 5 deep at most

# the unrolled form ("normal* (special normal*)*"): one step per run of plain characters, not
# one alternation per character (4 s -> 0.08 s on a 10 MB string)
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_TOML_STRING = re.compile(r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:\\.|[^"\\\n])*"|\'[^\'\n]*\'')
_TOML_COMMENT = re.compile(r"#[^\n]*")
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _depth(text: str) -> int:
    """Deepest bracket nesting of ``text`` with its strings (and comments) already removed."""
    depth = deepest = 0
    for ch in _NOT_BRACKET.sub("", text):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _check_depth(stripped: str, what: str, max_depth: int) -> None:
    if _depth(stripped) > max_depth:
        raise WasiToolError(f"{what} is nested more than {max_depth} levels deep; refusing it")


def read_text(path: Path, what: str | None = None, max_bytes: int = MAX_BYTES) -> str:
    """The UTF-8 text of ``path``, refused (before reading) when larger than ``max_bytes``."""
    what = what or str(path)
    try:
        size = Path(path).stat().st_size
        if size > max_bytes:
            raise WasiToolError(f"{what} is {size} bytes, more than the {max_bytes} allowed")
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WasiToolError(f"no such file: {path}") from None
    except UnicodeDecodeError as exc:
        raise WasiToolError(f"cannot read {what}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise WasiToolError(f"cannot read {what}: {exc.strerror or exc}") from None


def loads_json(
    text: str | bytes, what: str = "JSON", max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES
) -> Any:
    """``json.loads`` with size and depth limits; every failure is a WasiToolError."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if len(text) > max_bytes:
        raise WasiToolError(f"{what} is {len(text)} characters, more than the {max_bytes} allowed")
    _check_depth(_JSON_STRING.sub("", text), what, max_depth)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise WasiToolError(f"cannot read {what}: not JSON ({exc})") from None
    except RecursionError:  # unreachable after the scan; kept as the backstop
        raise WasiToolError(f"{what} is nested too deeply; refusing it") from None


def read_json(
    path: Path, what: str | None = None, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH
) -> Any:
    """The JSON in ``path`` (size checked before reading, depth before parsing)."""
    what = what or str(path)
    return loads_json(read_text(path, what, max_bytes), what, max_depth, max_bytes)


def loads_toml(
    text: str, what: str = "TOML", max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES
) -> dict[str, Any]:
    """``tomllib.loads`` with size and depth limits. A syntax error is left to the caller as
    ``tomllib.TOMLDecodeError`` (callers name the line); too big or too deep is a
    WasiToolError."""
    if len(text) > max_bytes:
        raise WasiToolError(f"{what} is {len(text)} characters, more than the {max_bytes} allowed")
    _check_depth(_TOML_COMMENT.sub("", _TOML_STRING.sub('""', text)), what, max_depth)
    try:
        return tomllib.loads(text)
    except RecursionError:  # a scan the regexes got wrong: still one line
        raise WasiToolError(f"{what} is nested too deeply; refusing it") from None


def read_toml(
    path: Path, what: str | None = None, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH
) -> dict[str, Any]:
    """The TOML in ``path`` (size checked before reading, depth before parsing)."""
    what = what or str(path)
    return loads_toml(read_text(path, what, max_bytes), what, max_depth, max_bytes)
