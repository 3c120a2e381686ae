"""The memory planner: sizes parse, an impossible budget is one line and exit 1, a possible one
picks a memory mode and records its prediction beside the measured peak."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from wasi_tool.cli.app import app
from wasi_tool.errors import WasiToolError
from wasi_tool.stages import FinetuneConfig
from wasi_tool.training.plan import parse_size

TINY = ["--random-init", "--arch", "vit_tiny_patch16_224", "--img-size", "32"]


def test_parse_size() -> None:
    assert parse_size("1.2GB") == 1_200_000_000
    assert parse_size("800MB") == 800_000_000 and parse_size("1.5G") == 1_500_000_000
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(WasiToolError):
            parse_size(bad)
    with pytest.raises(WasiToolError, match="not both"):
        FinetuneConfig(memory_budget="1GB", memory_mode="block")


@pytest.mark.slow
def test_impossible_budget_is_one_line_and_exit_1(tmp_path: Path) -> None:
    args = ["finetune", *TINY, "--method", "wasi", "--epochs", "1", "--max-steps", "2"]
    result = CliRunner().invoke(
        app, [*args, "--memory-budget", "10MB", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1
    assert "cannot be met (plans fit 95% of it): the least this run can reach is" in lines[0]
    assert "library floor" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_budget_plans_and_records_prediction(tmp_path: Path) -> None:
    from wasi_tool.models import ModelSource
    from wasi_tool.stages import run_finetune

    src = ModelSource(random_init=True, arch="vit_tiny_patch16_224", img_size=32)
    cfg = FinetuneConfig(method="wasi", epochs=1, max_steps=2, batch_size=16, memory_budget="50GB")
    metrics = run_finetune(src, "digits", cfg, tmp_path / "run").metrics
    plan = metrics.memory_plan
    assert plan is not None and plan["memory_mode"] == "off"  # the least recompute that fits
    assert [c["memory_mode"] for c in plan["candidates"]] == ["off", "attn", "mlp", "block"]
    saved = [c["saved_activations"] for c in plan["candidates"]]
    assert saved[-1] < saved[0]  # block recompute keeps the least
    assert plan["measured_peak_bytes"] == metrics.measured.peak_rss_bytes
    assert 0.5 < plan["measured_over_predicted"] < 1.5
