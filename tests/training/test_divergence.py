"""Divergence is caught at the mechanism: a non-finite weight after any step, a non-finite
held-out loss at the end of an epoch (that epoch is not checkpointed), and the message names
a checkpoint only when one exists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.models import ModelSource
from wasi_tool.stages import FinetuneConfig, run_finetune
from wasi_tool.training import loop
from wasi_tool.training.loop import first_non_finite_param

SRC = ModelSource(random_init=True, arch="vit_tiny_patch16_224", img_size=32)


def test_first_non_finite_param_names_the_tensor() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    assert first_non_finite_param(model) is None
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    assert first_non_finite_param(model) == "1.bias"
    with torch.no_grad():
        model[0].weight[1, 1] = float("nan")
    assert first_non_finite_param(model) == "0.weight"
    model[0].weight.requires_grad_(False)  # frozen weights are not the optimiser's doing
    assert first_non_finite_param(model) == "1.bias"


def test_one_absurd_step_writes_nothing(tmp_path: Path) -> None:
    cfg = FinetuneConfig(method="vanilla", epochs=1, batch_size=16, max_steps=1, lr=1e30)
    with pytest.raises(WasiToolError, match=r"training diverged: .*epoch 1, step 1") as err:
        run_finetune(SRC, "digits", cfg, tmp_path / "x")
    assert "nothing was saved" in str(err.value) and ".ckpt" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def _nan_on_epoch(monkeypatch: pytest.MonkeyPatch, bad_epoch: int) -> None:
    real = loop.evaluate
    calls = {"n": 0}

    def evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
        calls["n"] += 1
        found = real(*args, **kwargs)
        return {**found, "loss": float("nan")} if calls["n"] == bad_epoch else found

    monkeypatch.setattr(loop, "evaluate", evaluate)


def test_nan_test_loss_in_the_first_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_on_epoch(monkeypatch, 1)
    cfg = FinetuneConfig(method="vanilla", epochs=2, batch_size=16, max_steps=1)
    with pytest.raises(
        WasiToolError, match="held-out loss is nan at the end of epoch 1, step 1"
    ) as e:
        run_finetune(SRC, "digits", cfg, tmp_path / "x")
    assert "nothing was saved" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_nan_test_loss_is_not_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_on_epoch(monkeypatch, 2)
    cfg = FinetuneConfig(method="vanilla", epochs=3, batch_size=16, max_steps=1)
    with pytest.raises(WasiToolError, match="held-out loss is nan at the end of epoch 2") as err:
        run_finetune(SRC, "digits", cfg, tmp_path / "x")
    ckpt = tmp_path / "x.ckpt"
    assert f"the last good checkpoint is in {ckpt}/" in str(err.value)
    assert torch.load(ckpt / "last.pt", weights_only=True)["epoch"] == 0  # epoch 1's state
    assert not (tmp_path / "x").exists()
