"""finetune --match-memory (training/match.py): a run's setting chosen to meet another run's
measured training memory (issue 29's iso-memory runs)."""

from pathlib import Path

import pytest

from wasi_tool.errors import WasiToolError
from wasi_tool.models import ModelSource
from wasi_tool.stages import FinetuneConfig, run_finetune
from wasi_tool.training.match import read_target

QUICK = {"epochs": 1, "batch_size": 32, "max_steps": 1}


@pytest.fixture(scope="module")
def source() -> ModelSource:
    return ModelSource(random_init=True, arch="vit_tiny_patch16_224", img_size=32)


@pytest.fixture(scope="module")
def asi_run(tmp_path_factory: pytest.TempPathFactory, source: ModelSource) -> Path:
    out = tmp_path_factory.mktemp("match") / "asi"
    run_finetune(source, "digits", FinetuneConfig(method="asi", **QUICK), out)
    return out


def test_wasi_and_lora_land_within_10_percent_under_the_target(
    tmp_path: Path, source: ModelSource, asi_run: Path
) -> None:
    target = read_target(asi_run)
    assert target.method == "asi" and target.batch_size == 32
    for method, knob in (("wasi", "act_ranks"), ("lora", "lora_rank")):
        options = {"lora_rank": 2} if method == "lora" else {}
        config = FinetuneConfig.from_flat(
            method=method, match_memory=str(asi_run), **options, **QUICK
        )
        metrics = run_finetune(source, "digits", config, tmp_path / method).metrics
        match = metrics.match_memory
        assert match is not None and match["setting"] == knob
        assert match["target_bytes"] == target.bytes
        # the run's own measured training memory: at most the target, within 10% of it
        assert 0.9 * target.bytes <= match["run_bytes"] <= target.bytes, match
        # the probe that chose the setting measures what the run then measured
        assert match["probe_bytes"] == pytest.approx(match["run_bytes"], rel=1e-3)
        if method == "lora":  # the chosen rank replaced the configured one
            assert metrics.config["lora_rank"] == match["chosen"] != 2
        else:
            assert metrics.act_calibration is not None and metrics.act_calibration["matched"]


def test_a_run_matched_to_its_own_kind_takes_its_setting(
    tmp_path: Path, source: ModelSource
) -> None:
    r8 = FinetuneConfig.from_flat(method="lora", lora_rank=8, **QUICK)
    run_finetune(source, "digits", r8, tmp_path / "r8")
    config = FinetuneConfig(method="lora", match_memory=str(tmp_path / "r8"), **QUICK)
    match = run_finetune(source, "digits", config, tmp_path / "again").metrics.match_memory
    assert match is not None and match["chosen"] == 8
    assert match["run_over_target"] == pytest.approx(1.0, abs=1e-9)


def test_refusals_say_why(tmp_path: Path, source: ModelSource, asi_run: Path) -> None:
    with pytest.raises(WasiToolError, match="vanilla has no setting"):
        FinetuneConfig(method="vanilla", match_memory=str(asi_run))
    with pytest.raises(WasiToolError, match="without memory_budget"):
        FinetuneConfig(method="wasi", match_memory=str(asi_run), memory_budget="1GB")
    with pytest.raises(WasiToolError, match="not a finished finetune run"):
        read_target(tmp_path)
    # a target below what the method needs before any activation: refused, nothing written
    low = tmp_path / "low"
    config = FinetuneConfig(method="wasi", act_ranks=[1, 1, 1], **QUICK)
    run_finetune(source, "digits", config, low)
    with pytest.raises(WasiToolError, match="before any activation of its targets"):
        config = FinetuneConfig(method="asi", match_memory=str(low), **QUICK)
        run_finetune(source, "digits", config, tmp_path / "asi")
    assert not (tmp_path / "asi").exists()
