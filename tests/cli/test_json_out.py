"""--json on every command that prints a results table: the figures the command recorded in
its artifact, to a file or alone on stdout ('-': progress goes to stderr)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from wasi_tool.cli.app import app

TINY = ["--random-init", "--arch", "vit_tiny_patch16_224", "--img-size", "32"]


def test_compress_finetune_export_json(tmp_path: Path) -> None:
    runner = CliRunner()
    comp = tmp_path / "c"
    result = runner.invoke(app, ["compress", *TINY, "--out", str(comp), "--json", "-"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)  # stdout is the JSON alone
    assert payload["out"] == str(comp)
    assert payload["report"] == json.loads((comp / "report.json").read_text())

    tuned, figures = tmp_path / "t", tmp_path / "t.json"
    args = ["finetune", str(comp), "--data", "digits", "--epochs", "1", "--max-steps", "2"]
    result = runner.invoke(app, [*args, "--out", str(tuned), "--json", str(figures)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(figures.read_text())["metrics"]
    assert metrics == json.loads((tuned / "metrics.json").read_text())
    assert metrics["method"] == "wasi" and len(metrics["epochs"]) == 1

    exported = tmp_path / "e"
    result = runner.invoke(app, ["export", str(tuned), "--out", str(exported), "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["report"]
    assert report == json.loads((exported / "report.json").read_text())
    assert "NaN" not in result.stdout  # strict JSON
