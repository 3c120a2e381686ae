"""Issue 19b: the CLI's error path is one stderr line even when a library warned first, and
the bounded JSON/TOML reader refuses deep or large input with one WasiToolError."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import typer

from wasi_tool.cli import common
from wasi_tool.errors import WasiToolError
from wasi_tool.safe_read import loads_json, loads_toml, read_json, read_toml


def test_warnings_are_dropped_on_the_error_path(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit), common.user_errors():
        warnings.warn("torch noise", UserWarning, stacklevel=1)
        raise WasiToolError("refused")
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: refused"]


def test_warnings_still_show_when_the_command_succeeds() -> None:
    with pytest.warns(UserWarning, match="worth knowing"), common.user_errors():
        warnings.warn("worth knowing", UserWarning, stacklevel=1)


def test_bounded_readers(tmp_path: Path) -> None:
    assert loads_json('{"a": [1, {"b": "[[[["}]}') == {"a": [1, {"b": "[[[["}]}
    with pytest.raises(WasiToolError, match="nested more than 64 levels"):
        loads_json("[" * 65 + "]" * 65)
    assert loads_json("[" * 64 + "]" * 64)
    with pytest.raises(WasiToolError, match="not JSON"):
        loads_json("{oops")
    assert loads_toml('a = "[[[[" # [[[[\n[t]\nb = [[1], [2]]\n') == {
        "a": "[[[[",
        "t": {"b": [[1], [2]]},
    }
    with pytest.raises(WasiToolError, match="nested more than 64 levels"):
        loads_toml("a = " + "[" * 2000 + "]" * 2000)
    big = tmp_path / "big.json"
    big.write_text("[" + "1," * 1000 + "1]")
    with pytest.raises(WasiToolError, match="more than the 100 allowed"):
        read_json(big, max_bytes=100)
    with pytest.raises(WasiToolError, match="no such file"):
        read_toml(tmp_path / "absent.toml")
