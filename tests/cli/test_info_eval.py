"""`wasi-tool info` and `wasi-tool eval` on a tiny fine-tuned artifact, text and JSON."""

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from wasi_tool import artifact
from wasi_tool.cli.app import app

runner = CliRunner()
TINY_FLAGS = ["--arch", "vit_tiny_patch16_224", "--img-size", "32"]


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("info") / "ft"
    result = invoke(
        "finetune", "--random-init", *TINY_FLAGS, "--data", "digits", "--classes", "5,6,7,8,9",
        "--method", "wasi", "--act-ranks", "2,2,2", "--epochs", "1", "--max-steps", "1",
        "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return out


def test_info_text_says_what_and_how(tuned: Path) -> None:
    result = invoke("info", tuned)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "a finetune artifact" in out and "how it was made" in out
    assert "compress" in out and "method=wasi" in out and "classes=5,6,7,8,9" in out
    assert "blocks.11.mlp.fc2" in out and "768 x 192" in out
    digest = artifact.read_manifest(tuned)["files"]["model.safetensors"]["sha256"]
    assert digest in out and "mismatch" not in out


def test_info_json_and_a_changed_file(tuned: Path, tmp_path: Path) -> None:
    result = invoke("info", tuned, "--json", "-")
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)  # JSON only, no table
    assert found["kind"] == "finetune"
    assert [s["stage"] for s in found["stages"]] == ["compress", "finetune"]
    assert len(found["layers"]) == 24 and all(r["rank"] for r in found["layers"])
    assert found["files"]["model.safetensors"]["status"] == "ok"
    size = (tuned / "model.safetensors").stat().st_size
    assert found["files"]["model.safetensors"]["bytes"] == size

    copy = tmp_path / "copy"
    shutil.copytree(tuned, copy)
    (copy / "report.json").write_text("{}\n")
    out = tmp_path / "info.json"
    result = invoke("info", copy, "--json", out)
    # the table and the JSON still come out, and the exit code says it does not verify
    assert result.exit_code == 1 and "│ mismatch" in result.stdout.replace("┃", "│")
    assert result.stderr.splitlines() == [
        f"error: {copy}: 1 file(s) do not match the manifest: report.json"
    ]
    assert json.loads(out.read_text())["files"]["report.json"]["status"] == "mismatch"


def test_info_of_a_non_artifact_is_one_line(tmp_path: Path) -> None:
    for target in (tmp_path, tmp_path / "absent"):
        result = invoke("info", target)
        assert result.exit_code == 1
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines


def test_eval_reproduces_the_finetune_held_out_figures(tuned: Path, tmp_path: Path) -> None:
    final = json.loads((tuned / "metrics.json").read_text())["epochs"][-1]
    preds = tmp_path / "preds.csv"
    result = invoke("eval", tuned, "--data", "digits", "--predictions", preds)
    assert result.exit_code == 0, result.stderr
    assert f"{final['test_accuracy']:.4f}" in result.stdout
    assert "the finetune stage's" in result.stdout  # the split and classes it was tuned with

    result = invoke("eval", tuned, "--data", "digits", "--json", "-")
    found = json.loads(result.stdout)
    assert found["accuracy"] == pytest.approx(final["test_accuracy"])
    assert found["loss"] == pytest.approx(final["test_loss"], rel=1e-5)
    assert found["settings"]["classes"] == [5, 6, 7, 8, 9]

    rows = list(csv.DictReader(preds.open()))
    assert len(rows) == found["examples"]
    hits = sum(r["label"] == r["prediction"] for r in rows)
    assert hits / len(rows) == pytest.approx(found["accuracy"])
    assert {r["label_name"] for r in rows} <= {"5", "6", "7", "8", "9"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--classes", "0,1,2"], "the model has 5 classes"),
        (["--split", "val"], "split must be one of"),
        (["--data", "absent.npz"], "no such dataset"),
    ],
)
def test_eval_bad_input(tuned: Path, tmp_path: Path, args: list[str], message: str) -> None:
    preds = tmp_path / "p.csv"
    result = invoke("eval", tuned, "--data", "digits", *args, "--predictions", preds)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not preds.exists()
