"""One training session: finetune and the training bench prepare the same model from the same
settings, and the rank rules are named once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wasi_tool.errors import WasiToolError
from wasi_tool.training.config import FinetuneConfig
from wasi_tool.training.session import RANK_RULES, rule_of, shape_ranks


@pytest.mark.slow
@pytest.mark.parametrize("method", ["wasi", "vanilla"])
def test_finetune_and_bench_save_the_same_bytes_per_step(method: str, tmp_path: Path) -> None:
    """The same settings through ``finetune`` and ``bench --train``'s measurement: the same
    targets, ranks and saved bytes per step (the bench's synthetic batch has the data's shape)."""
    from wasi_tool.bench.train import TrainBenchConfig, measure
    from wasi_tool.models.loading import ModelSource
    from wasi_tool.stages.finetune import run_finetune

    arch = {"arch": "vit_tiny_patch16_224", "img_size": 32, "random_init": True}
    ranks = [2, 3, 8] if method == "wasi" else None
    cfg = FinetuneConfig(
        method=method, targets="mlp", act_ranks=ranks, epochs=1, batch_size=8, max_steps=3,
        classes=list(range(10)),
    )  # fmt: skip
    ft = run_finetune(ModelSource(**arch, seed=0, num_classes=10), "digits", cfg, tmp_path / "a")
    bench = measure(
        TrainBenchConfig(
            **arch, num_classes=10, method=method, targets="mlp", act_ranks=ranks,
            batch_size=8, steps=2, warmup=1,
        )
    )  # fmt: skip
    saved = ft.metrics.measured.saved_bytes_per_step
    assert bench.targets == len(ft.metrics.targets)
    assert bench.saved_bytes_total == saved.total
    assert bench.saved_bytes_targets == saved.targets
    if ranks:
        assert bench.act_ranks_first_target == ranks


def test_rank_rules_are_chosen_by_the_settings() -> None:
    assert rule_of(FinetuneConfig(method="wasi", act_ranks=[2, 2, 2])) == "explicit"
    assert rule_of(FinetuneConfig(method="wasi", act_budget_mb=1.0)) == "budget"
    assert rule_of(FinetuneConfig(method="wasi")) == "eps"
    assert rule_of(FinetuneConfig(method="wasi"), {"blocks.0.mlp.fc1": [1, 1, 1]}) == "per-layer"
    assert set(RANK_RULES) == {"explicit", "per-layer", "eps", "budget", "shape"}
    assert shape_ranks((32, 65, 192)) == (8, 16, 32)
    assert shape_ranks((8, 7, 7, 96)) == (2, 3, 3, 32)


def test_per_layer_ranks_must_cover_every_target() -> None:
    import torch

    from wasi_tool.training.session import choose_act_ranks

    cfg = FinetuneConfig(method="wasi")
    with pytest.raises(WasiToolError, match="no activation ranks for target"):
        choose_act_ranks(
            torch.nn.Linear(2, 2), ["a", "b"], cfg, lambda: (torch.zeros(1), torch.zeros(1)),
            "per-layer", {"a": [1, 1, 1]}, "runs/x",
        )  # fmt: skip


@pytest.mark.slow
def test_finetune_factors_dense_targets_on_its_own_training_data(tmp_path: Path) -> None:
    """--calibrate N: the dense targets are factored in the metric of N training inputs, and
    the artifact's compress record says so."""
    from wasi_tool.models.loading import ModelSource
    from wasi_tool.stages.finetune import run_finetune

    src = ModelSource(arch="vit_tiny_patch16_224", img_size=32, random_init=True, seed=0)
    cfg = FinetuneConfig(
        method="wsi", targets="mlp", eps=0.6, calibrate=16, epochs=1, batch_size=8, max_steps=1
    )
    ft = run_finetune(src, "digits", cfg, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    compress = next(s for s in manifest["stages"] if s["stage"] == "compress")
    assert compress["config"]["calibrate"] == "training data:16"
    assert ft.metrics.config["calibrate"] == 16
