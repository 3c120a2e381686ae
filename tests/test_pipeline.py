"""Pipelines: a tiny recipe end to end, the reuse rule, overrides, and recipe errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wasi_tool import artifact
from wasi_tool.cli.app import app
from wasi_tool.errors import WasiToolError
from wasi_tool.pipeline import load_pipeline, parse_value, run_pipeline

TINY_RECIPE = """
[pipeline]
name = "tiny"
description = "every stage kind, in seconds"

[[stages]]
name = "compress"
kind = "compress"
source = { random_init = true, arch = "vit_tiny_patch16_224", img_size = 32 }
rank_ratio = 0.5

[[stages]]
name = "tune"
kind = "finetune"
input = "compress"
data = "digits"
method = "wasi"
act_ranks = [4, 3, 8]
epochs = 1
batch_size = 16
max_steps = 2
classes = [0, 1, 2]

[[stages]]
name = "export"
kind = "export"
input = "tune"

[[stages]]
name = "bench"
kind = "bench"
input = "export"
repeats = 2
warmup = 0

[[stages]]
name = "report"
kind = "report"
"""


def _recipe(tmp_path: Path, text: str = TINY_RECIPE) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_tiny_recipe_end_to_end_and_reuse(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    records = run_pipeline(load_pipeline(_recipe(tmp_path)), run_dir)
    assert [r.name for r in records] == ["compress", "tune", "export", "bench", "report"]
    assert not any(r.reused for r in records)
    for name in ("compress", "tune", "export"):
        manifest = artifact.read_manifest(run_dir / name)
        assert manifest["stages"][-1]["stage"] == ("finetune" if name == "tune" else name)
    assert [s["stage"] for s in artifact.read_manifest(run_dir / "export")["stages"]] == [
        "compress", "finetune", "export",
    ]  # fmt: skip
    assert json.loads((run_dir / "tune" / "metrics.json").read_text())["classes"] == ["0", "1", "2"]
    bench = json.loads((run_dir / "bench" / "bench.json").read_text())
    assert bench["kind"] == "inference" and bench["models"]["a"]["p50_ms"] > 0
    report = (run_dir / "report" / "report.md").read_text()
    assert "| tune | wasi |" in report and "training.png" in report
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert [s["name"] for s in state["stages"]] == ["compress", "tune", "export", "bench", "report"]

    again = run_pipeline(load_pipeline(_recipe(tmp_path)), run_dir)
    assert all(r.reused for r in again)
    assert [r.key for r in again] == [r.key for r in records]

    # A changed setting re-runs that stage and everything downstream, nothing upstream.
    changed = run_pipeline(load_pipeline(_recipe(tmp_path), ["tune.epochs=2"]), run_dir)
    assert [r.reused for r in changed] == [True, False, False, False, False]
    assert json.loads((run_dir / "tune" / "metrics.json").read_text())["config"]["epochs"] == 2
    forced = run_pipeline(load_pipeline(_recipe(tmp_path), ["tune.epochs=2"]), run_dir, force=True)
    assert not any(r.reused for r in forced)


def test_overrides() -> None:
    assert parse_value("0.9") == 0.9 and parse_value("[5, 6]") == [5, 6]
    assert parse_value("true") is True and parse_value("digits") == "digits"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.replace("rank_ratio = 0.5", "rank_ratio = 0.5\nepsilon = 3"),
            r"tiny.toml:11: unknown key 'epsilon' for a compress stage",
        ),
        (lambda t: t.replace('kind = "export"', 'kind = "export'), r"TOML syntax error.*line 26"),
        (lambda t: t.replace("rank_ratio = 0.5", "eps = 1.5"), r"stage 'compress': eps must be in"),
        (
            lambda t: t.replace('input = "tune"', 'input = "nope"'),
            r"reads 'nope', which is not an earlier",
        ),
        (lambda t: t.replace('kind = "bench"', 'kind = "deploy"'), r"has kind 'deploy'"),
        (lambda t: t.replace('data = "digits"\n', ""), r"a finetune stage needs data"),
        (lambda t: t + "\n[extra]\nx = 1\n", r"unknown top-level key 'extra'"),
        (
            lambda t: t.replace("img_size = 32 }", "img_size = 32, colour = 1 }"),
            r"unknown source key",
        ),
    ],
)
def test_recipe_errors_name_the_line(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    path = _recipe(tmp_path, edit(TINY_RECIPE))
    with pytest.raises(WasiToolError, match=message):
        load_pipeline(path)


def test_bad_override() -> None:
    recipe = Path(__file__).parent.parent / "pipelines" / "demo.toml"
    with pytest.raises(WasiToolError, match=r"no setting 'speed'"):
        load_pipeline(recipe, ["wasi.speed=2"])
    with pytest.raises(WasiToolError, match="no stage named 'nope'"):
        load_pipeline(recipe, ["nope.eps=0.5"])
    with pytest.raises(WasiToolError, match=r"stage\.key=value"):
        load_pipeline(recipe, ["eps=0.5"])


@pytest.mark.parametrize("name", ["demo", "vit_b32_cifar10_wasi", "swin_t_cifar10_wasi"])
def test_shipped_recipes_are_valid(name: str) -> None:
    recipe = load_pipeline(Path(__file__).parent.parent / "pipelines" / f"{name}.toml")
    assert recipe.stages[-1].kind == "report"


def test_cli_run_errors_are_one_line(tmp_path: Path) -> None:
    path = _recipe(
        tmp_path, TINY_RECIPE.replace("rank_ratio = 0.5", "rank_ratio = 0.5\nepsilon = 3")
    )
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "tiny.toml:11: unknown key 'epsilon'" in lines[0]
    assert not (tmp_path / "r").exists()


def test_a_set_error_names_the_set_not_the_recipe_line(tmp_path: Path) -> None:
    path = _recipe(tmp_path, TINY_RECIPE.replace("rank_ratio = 0.5", "eps = 0.8"))
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["run", str(path), "--set", "compress.eps=1.3", "-o", out])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --set compress.eps=1.3: "), lines
    assert "eps must be in" in lines[0] and "tiny.toml:" not in lines[0]
    assert not out.exists()
    # a recipe that is wrong as written is still reported at its line, --set or not
    bad = _recipe(tmp_path, TINY_RECIPE.replace("rank_ratio = 0.5", "eps = 1.5"))
    with pytest.raises(WasiToolError, match=r"tiny.toml:\d+: stage 'compress': eps must be in"):
        load_pipeline(bad, ["compress.force=true"])


def test_a_failed_run_leaves_no_directory(tmp_path: Path) -> None:
    absent = tmp_path / "absent.pth"
    path = _recipe(
        tmp_path,
        TINY_RECIPE.replace("random_init = true,", f"checkpoint = '{absent}',"),
    )
    out = tmp_path / "runs" / "r"  # its parent is created by the run as well
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 1 and "no such file" in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()
