"""`wasi-tool compress --calibrate DATA[:N] --rank-budget F`: end to end on the tiny ViT with
the digits data, flags reaching the library, and bad specs as one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from wasi_tool.cli.app import app

runner = CliRunner()
TINY_FLAGS = ["--random-init", "--arch", "vit_tiny_patch16_224", "--img-size", "32"]


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_calibrated_compress_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "cal"
    result = invoke(
        "compress", *TINY_FLAGS, "--num-classes", "10", "--calibrate", "digits:64",
        "--rank-budget", "0.1", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "held-out err plain" in result.stdout and "calibrated on 64 samples of digits" in (
        result.stdout
    )
    assert "rank budget 0.1" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    stage = manifest["stages"][-1]
    assert stage["config"]["calibrate"] == "digits:64" and stage["config"]["rank_budget"] == 0.1
    assert stage["calibration"]["samples"] == 64
    assert all(row["heldout_error"]["calibrated"] is not None for row in manifest["layers"])


def test_flags_reach_the_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run(source: Any, config: Any, out: Path, **kw: Any) -> None:
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr("wasi_tool.stages.compress.run_compress", fake_run)  # imported at run
    invoke(
        "compress", *TINY_FLAGS, "--calibrate", "emoji-lang:300:128", "--calibrate-seed", "5",
        "--calibrate-damp", "0.01", "--rank-budget", "0.4", "--out", tmp_path / "x",
    )  # fmt: skip
    cfg = seen["config"]
    assert (cfg.calibrate, cfg.calibrate_seed, cfg.calibrate_damp) == (
        "emoji-lang:300:128",
        5,
        0.01,
    )
    assert cfg.rank_budget == 0.4 and cfg.eps is None


BAD = {
    "no samples": (["--calibrate", "digits:0"], "N >= 1"),
    "unknown data": (["--calibrate", "no-such-data:16"], "no such dataset"),
    "budget zero": (["--rank-budget", "0"], "rank_budget"),
    "budget above one": (["--rank-budget", "1.5"], "rank_budget"),
    "budget and eps": (["--rank-budget", "0.4", "--eps", "0.8"], "not both"),
    "more samples than data": (["--calibrate", "digits:100000"], "training split"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_spec_is_one_line_and_nothing_written(case: str, tmp_path: Path) -> None:
    flags, expected = BAD[case]
    out = tmp_path / "runs" / "out"
    result = invoke("compress", *TINY_FLAGS, "--num-classes", "10", *flags, "--out", out)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()
