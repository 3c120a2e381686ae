"""Acceptance: a ViT on nn.TransformerEncoderLayer compresses, trains with wasi through
wasi_tool.prepare in a plain loop, evaluates, saves, reloads with its class named, and exports
to ONNX with the parity checks; the class is never imported unless named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import wasi_tool
from wasi_tool import artifact
from wasi_tool.cli.app import app
from wasi_tool.errors import WasiToolError
from wasi_tool.models.loading import ModelSource, load_model
from wasi_tool.nn.factored import FactoredLinear
from wasi_tool.stages.export import ExportConfig, run_export

from .models import TinyViT

CLASS = "tests.api.models:TinyViT"
CONFIG = {"dim": 32, "depth": 2, "num_classes": 5}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyViT(**CONFIG)
    wasi_tool.compress_(model, wasi_tool.CompressConfig(targets="mlp", eps=0.8))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 16, 16, generator=gen)
    y = torch.randint(0, 5, (16,), generator=gen)
    model, optimizer = wasi_tool.prepare(
        model, "wasi", "mlp", lr=0.05, example_input=x[:8], verbose=False
    )
    factor = model.encoder.layers[0].linear1
    before = (factor.L @ factor.R).detach().clone()
    model.train()
    losses = []
    for _ in range(4):
        for xb, yb in zip(x.split(8), y.split(8), strict=True):
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert not torch.allclose(factor.L @ factor.R, before)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    out = tmp_path_factory.mktemp("custom") / "vit"
    wasi_tool.save_artifact(model, out, example_input=x[:1], config=CONFIG)
    return out, x, logits


def test_artifact_records_class_config_and_input(saved: tuple[Path, ...]) -> None:
    out = saved[0]
    manifest = artifact.read_manifest(out)  # type: ignore[arg-type]
    kwargs = manifest["model"]["kwargs"]
    assert manifest["model"]["arch"] == "custom"
    assert kwargs["model_class"] == CLASS and kwargs["config"] == CONFIG
    assert kwargs["input_shape"] == [1, 3, 16, 16]
    _, meta = artifact.load_weights(out / artifact.WEIGHTS)  # type: ignore[operator]
    assert json.loads(meta["model_kwargs"])["model_class"] == CLASS
    assert manifest["stages"][-1]["stage"] == "save_artifact"


def test_reload_needs_the_class_named(saved: tuple[Path, torch.Tensor, torch.Tensor]) -> None:
    out, x, logits = saved
    with pytest.raises(WasiToolError, match=re.escape(f"pass --model-class {CLASS}")):
        load_model(ModelSource(checkpoint=out))
    with pytest.raises(WasiToolError, match=re.escape("not tests.api.models:Seq2Seq")):
        load_model(ModelSource(checkpoint=out, model_class="tests.api.models:Seq2Seq"))
    loaded = load_model(ModelSource(checkpoint=out, model_class=CLASS))
    assert isinstance(loaded.model, TinyViT)
    assert sum(isinstance(m, FactoredLinear) for m in loaded.model.modules()) == 4
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), logits)


def test_export_onnx_with_parity(saved: tuple[Path, ...], tmp_path: Path) -> None:
    out = saved[0]
    result = run_export(
        ModelSource(checkpoint=out, model_class=CLASS),  # type: ignore[arg-type]
        ExportConfig(check_batch=3),
        tmp_path / "export",
    )
    assert (tmp_path / "export" / "model.onnx").is_file()
    assert result.checks and all(r.passed for r in result.checks)
    assert {r.inputs for r in result.checks} == {"random batch 1", "random batch 3"}


def test_cli_export_without_model_class_is_one_line(
    saved: tuple[Path, ...], tmp_path: Path
) -> None:
    res = CliRunner().invoke(app, ["export", str(saved[0]), "--out", str(tmp_path / "e")])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()  # stdout may say "exporting and checking..."
    assert len(lines) == 1 and lines[0].startswith("error:") and "--model-class" in lines[0]
    assert not (tmp_path / "e").exists()


def test_save_refuses_unimportable_or_wrong_class(tmp_path: Path) -> None:
    model = TinyViT()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(WasiToolError, match="not the model's class"):
        wasi_tool.save_artifact(
            model, tmp_path / "a", example_input=x, model_class="tests.api.models:Seq2Seq"
        )
    with pytest.raises(WasiToolError, match="cannot import"):
        wasi_tool.save_artifact(model, tmp_path / "b", example_input=x, model_class="no.such:X")
    with pytest.raises(WasiToolError, match="JSON"):
        wasi_tool.save_artifact(model, tmp_path / "c", example_input=x, config={"f": object()})
    with pytest.raises(WasiToolError, match="do not fit"):  # config differs from the model
        wasi_tool.save_artifact(model, tmp_path / "d", example_input=x, config={"dim": 16})
    assert not any(tmp_path.iterdir())
