import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from wasi_tool import artifact
from wasi_tool.data import batch_transform
from wasi_tool.errors import WasiToolError
from wasi_tool.models import ModelSource, load_model
from wasi_tool.nn import FactoredLinear
from wasi_tool.stages import FinetuneConfig, run_finetune
from wasi_tool.training import evaluate


@pytest.fixture
def src(tiny_spec: Mapping[str, Any]) -> ModelSource:
    return ModelSource(random_init=True, arch=tiny_spec["arch"], img_size=32)


class Interrupt:
    """A progress sink that stops the run (like Ctrl-C) when an epoch starts."""

    def __init__(self, at_epoch: int) -> None:
        self.at_epoch = at_epoch

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if epoch == self.at_epoch:
            raise KeyboardInterrupt

    def step(self, *args: Any) -> None:
        pass

    def end_epoch(self, record: dict[str, Any]) -> None:
        pass

    def note(self, message: str) -> None:
        pass


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return artifact.load_weights(out / "model.safetensors")[0]


@pytest.mark.slow
def test_wasi_on_digits_comes_close_to_vanilla(tmp_path: Path, src: ModelSource) -> None:
    results = {}
    for method in ("vanilla", "wasi"):
        cfg = FinetuneConfig(method=method, eps=0.9, epochs=3, batch_size=64)
        results[method] = run_finetune(src, "digits", cfg, tmp_path / method).metrics.to_dict()
    acc = {m: r["final"]["test_accuracy"] for m, r in results.items()}
    print("digits test accuracy after 3 epochs:", acc)
    assert acc["vanilla"] > 0.6
    assert acc["wasi"] > acc["vanilla"] - 0.1
    wasi = results["wasi"]
    assert len(wasi["weight_ranks"]) == 24 and len(wasi["act_ranks"]) == 24
    saved_v = results["vanilla"]["measured"]["saved_bytes_per_step"]["targets"]
    saved_w = wasi["measured"]["saved_bytes_per_step"]["targets"]
    assert saved_w * 10 < saved_v  # measured, in the targeted layers


def test_artifact_and_metrics(tmp_path: Path, src: ModelSource) -> None:
    cfg = FinetuneConfig(method="wasi", act_ranks=[8, 3, 16], epochs=1, batch_size=32, max_steps=3)
    result = run_finetune(src, "digits", cfg, tmp_path / "run")
    out = result.out
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "metrics.json",
        "model.safetensors",
        "report.json",
    ]
    assert not (tmp_path / "run.ckpt").exists()
    manifest = artifact.read_manifest(out)
    assert [s["stage"] for s in manifest["stages"]] == ["compress", "finetune"]
    assert manifest["model"]["kwargs"]["num_classes"] == 10
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["act_ranks"]["blocks.0.mlp.fc1"] == [8, 3, 16]
    layer = metrics["analytic"]["layers"][0]
    assert layer["act_shape"] == [32, 5, 192]
    assert layer["memory_elements"]["activation"] == 8 * 3 * 16 + 32 * 8 + 5 * 3 + 192 * 16
    assert "flops_per_step_reference_code" in layer
    assert metrics["measured"]["steps"] == 3 and metrics["measured"]["peak_rss_bytes"] > 0
    model = metrics["analytic"]["model"]  # every parameter trains, the WASI factors counted once
    assert model["trainable_parameters"] == model["parameters"] == model["gradient_elements"]
    # The artifact reloads as FactoredLinear layers and scores what training reported.
    loaded = load_model(ModelSource(checkpoint=out))
    assert isinstance(loaded.model.get_submodule("blocks.0.mlp.fc1"), FactoredLinear)
    from wasi_tool.data import load_data

    data = load_data("digits", 32, 0.1, cfg.seed)
    acc = evaluate(loaded.model, data.test, batch_transform(loaded), 64)["accuracy"]
    assert acc == pytest.approx(metrics["final"]["test_accuracy"])


@pytest.mark.parametrize("method", ["wasi", "asi"])
def test_resume_after_interrupt_gives_identical_weights(
    tmp_path: Path, method: str, src: ModelSource
) -> None:
    cfg = FinetuneConfig(method=method, act_ranks=[8, 3, 16], epochs=2, batch_size=32, max_steps=3)
    straight = run_finetune(src, "digits", cfg, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run_finetune(src, "digits", cfg, tmp_path / "b", progress=Interrupt(at_epoch=1))
    assert (tmp_path / "b.ckpt" / "last.pt").is_file() and not (tmp_path / "b").exists()
    with pytest.raises(WasiToolError, match="pass --resume"):
        run_finetune(src, "digits", cfg, tmp_path / "b")
    resumed = run_finetune(src, "digits", cfg, tmp_path / "b", resume=True)
    a, b = _weights(straight.out), _weights(resumed.out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight.metrics.to_dict()["epochs"] == [
        {**r, "seconds": s["seconds"]}
        for r, s in zip(
            resumed.metrics.to_dict()["epochs"], straight.metrics.to_dict()["epochs"], strict=True
        )
    ]


def test_resume_needs_a_checkpoint_and_the_same_settings(tmp_path: Path, src: ModelSource) -> None:
    cfg = FinetuneConfig(method="wsi", epochs=2, batch_size=32, max_steps=2)
    with pytest.raises(WasiToolError, match="nothing to resume"):
        run_finetune(src, "digits", cfg, tmp_path / "r", resume=True)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(src, "digits", cfg, tmp_path / "r", progress=Interrupt(at_epoch=1))
    other = FinetuneConfig(method="wsi", epochs=2, batch_size=32, max_steps=2, lr=0.01)
    with pytest.raises(WasiToolError, match="other settings"):
        run_finetune(src, "digits", other, tmp_path / "r", resume=True)


def test_divergence_is_a_clear_error(tmp_path: Path, src: ModelSource) -> None:
    cfg = FinetuneConfig(
        method="vanilla", epochs=1, batch_size=32, max_steps=20, lr=1e12, lr_min=1e12, clip=None
    )
    with pytest.raises(WasiToolError, match=r"training diverged: .* at epoch 1, step \d+") as err:
        run_finetune(src, "digits", cfg, tmp_path / "d")
    assert "first non-finite output: " in str(err.value) or "gradient in " in str(err.value)
    assert not (tmp_path / "d").exists()


def test_divergence_names_the_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, src: ModelSource
) -> None:
    from wasi_tool.nn import WASILinear

    original = WASILinear.forward

    def poisoned(self: WASILinear, x: torch.Tensor) -> torch.Tensor:
        out = original(self, x)
        if self is poisoned_layer[0]:
            out = out + float("nan")
        return out

    poisoned_layer: list[Any] = []
    monkeypatch.setattr(WASILinear, "forward", poisoned)

    cfg = FinetuneConfig(method="wasi", act_ranks=[8, 3, 16], epochs=1, batch_size=16, max_steps=2)
    import wasi_tool.training.prepare as ft

    real_prepare = ft.prepare_

    def prepare_and_pick(model: Any, *args: Any) -> None:
        real_prepare(model, *args)
        poisoned_layer.append(model.get_submodule("blocks.3.mlp.fc2"))

    monkeypatch.setattr(ft, "prepare_", prepare_and_pick)
    with pytest.raises(WasiToolError, match=r"first non-finite output: blocks\.3\.mlp\.fc2\)"):
        run_finetune(src, "digits", cfg, tmp_path / "n")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "sgd"}, "unknown method"),
        ({"method": "wasi", "momentum": 0.9}, "momentum"),
        ({"act_ranks": [1, 2]}, "act_ranks takes 3"),
        ({"act_eps": 0.5, "act_budget_mb": 3.0}, "give one of"),
        ({"eps": 0.0}, "eps must be in"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"lr": 0.01, "lr_min": 0.1}, "lr_min <= lr"),
        ({"update_form": "fast"}, "update_form"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(WasiToolError, match=message):
        FinetuneConfig(**kwargs)


def test_default_act_eps_follows_eps() -> None:
    assert FinetuneConfig(method="wasi", eps=0.7).act_eps == 0.7
    assert FinetuneConfig(method="wsi", eps=0.7).act_eps is None
    assert FinetuneConfig.from_dict(FinetuneConfig().to_dict()) == FinetuneConfig()


@pytest.mark.slow
def test_swin_trains_with_3d_and_4d_activations(tmp_path: Path) -> None:
    """timm's Swin runs its MLP on (B, H*W, C) but its patch merging on (B, H, W, 4C)."""
    src = ModelSource(random_init=True, arch="swin_tiny_patch4_window7_224")
    cfg = FinetuneConfig(
        method="wasi", act_eps=0.5, targets="layers.3.downsample.reduction,layers.3.*fc1",
        epochs=1, batch_size=4, max_steps=2, classes=[0, 1],
    )  # fmt: skip
    metrics = run_finetune(src, "digits", cfg, tmp_path / "swin").metrics.to_dict()
    assert len(metrics["act_ranks"]["layers.3.downsample.reduction"]) == 4
    assert len(metrics["act_ranks"]["layers.3.blocks.0.mlp.fc1"]) == 3
    layer = metrics["analytic"]["layers"][0]
    assert layer["act_shape"] == [4, 7, 7, 1536]
    assert "flops_per_step_reference_code" not in layer  # the reference counts 3-D only
