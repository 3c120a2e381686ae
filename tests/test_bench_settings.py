"""A run's training bench trains what the fine-tune says (its calibrated ranks), every table
states what it ran with, every median has its spread, and bench --vs does not depend on order."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from wasi_tool.bench import InferenceBenchConfig, get_profile, run_inference_bench
from wasi_tool.bench.train import TrainBenchResult, settings_of
from wasi_tool.pipeline import load_pipeline, run_pipeline

RECIPE = """
[pipeline]
name = "settings"
description = "a fine-tune and the training bench that trains what it trained"

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
max_steps = 3
classes = [0, 1, 2]

[[stages]]
name = "bench-like"
kind = "bench"
input = "compress"
train = true
like = "tune"
method = "wasi"
vs = "vanilla"
batch_size = 16
steps = 3
warmup = 1

[[stages]]
name = "report"
kind = "report"
"""


def test_settings_of_reads_a_finetune(tmp_path: Path) -> None:
    assert settings_of(tmp_path) is None  # not a fine-tune
    (tmp_path / "metrics.json").write_text(
        json.dumps(
            {
                "targets": ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"],
                "act_ranks": {"blocks.0.mlp.fc1": [4, 3, 8], "blocks.1.mlp.fc1": [5, 2, 9]},
                "config": {"eps": 0.7, "seed": 3, "keep_rate": 0.25, "epochs": 9},
            }
        )
    )
    found = settings_of(tmp_path)
    assert found is not None
    assert found["targets"] == "blocks.0.mlp.fc1,blocks.1.mlp.fc1"
    assert found["act_ranks_by_layer"]["blocks.1.mlp.fc1"] == [5, 2, 9]
    assert (found["eps"], found["seed"], found["keep_rate"]) == (0.7, 3, 0.25)
    assert "epochs" not in found  # not a bench setting


@pytest.mark.slow
def test_run_bench_trains_the_finetunes_ranks_and_tables_say_so(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    run_dir = tmp_path / "run"
    run_pipeline(load_pipeline(recipe), run_dir)
    tune = json.loads((run_dir / "tune" / "metrics.json").read_text())
    bench = TrainBenchResult.from_dict(
        json.loads((run_dir / "bench-like" / "bench.json").read_text())
    )
    wasi = bench.methods["wasi"]
    assert wasi.act_ranks_first_target == tune["act_ranks"][tune["targets"][0]] == [4, 3, 8]
    assert wasi.targets == len(tune["targets"])
    assert wasi.act_ranks_rule == "calibrated by fine-tune stage 'tune'"
    assert wasi.p10_step_seconds is not None and wasi.p90_step_seconds is not None
    assert wasi.p10_step_seconds <= wasi.median_step_seconds <= wasi.p90_step_seconds
    report = (run_dir / "report" / "report.md").read_text()
    assert "activation ranks from fine-tune stage 'tune'" in report
    assert "4x3x8 (calibrated by fine-tune stage 'tune')" in report  # the bench's tables
    assert "4x3x8 (" in report.split("## Fine-tuning")[1]  # the fine-tune table, same ranks
    assert "p10-p90" in report
    assert tune["measured"]["p10_step_seconds"] is not None


def test_vs_memory_does_not_depend_on_which_loads_first(
    tmp_path: Path, tiny_onnx: Callable[..., Path]
) -> None:
    a = tiny_onnx(tmp_path / "a.onnx")
    b = tiny_onnx(tmp_path / "b.onnx", seed=1)
    quick = InferenceBenchConfig(batch_size=2, warmup=0, repeats=2)
    ab = run_inference_bench(a, b, get_profile("host"), quick)
    ba = run_inference_bench(b, a, get_profile("host"), quick)
    # onnxruntime's one-time set-up (tens of MB) used to fall on whichever loaded first
    grow_ab = [ab["models"][k]["rss_growth_bytes"] for k in ("a", "b")]
    grow_ba = [ba["models"][k]["rss_growth_bytes"] for k in ("b", "a")]
    for x, y in (*zip(grow_ab, grow_ba, strict=True), grow_ab):
        assert abs(x - y) < 0.5 * max(x, y), (grow_ab, grow_ba)
    assert ab["models"]["a"]["p10_ms"] <= ab["models"]["a"]["p50_ms"]
