import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import load_file

from wasi_tool import onnxio
from wasi_tool.errors import WasiToolError
from wasi_tool.models import ModelSource, load_model
from wasi_tool.nn import FactoredLinear
from wasi_tool.stages import CompressConfig, run_compress
from wasi_tool.stages.export import ExportConfig, run_export


@pytest.fixture(scope="module")
def compressed_vit(tmp_path_factory: pytest.TempPathFactory, tiny_spec: Mapping[str, Any]) -> Path:
    out = tmp_path_factory.mktemp("vit") / "c"
    src = ModelSource(random_init=True, arch=tiny_spec["arch"], img_size=32, num_classes=10)
    return run_compress(src, CompressConfig(targets="all", rank_ratio=0.25), out).out


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.slow
def test_onnx_export_of_a_compressed_vit(
    compressed_vit: Path, tmp_path: Path, images: Callable[..., torch.Tensor]
) -> None:
    cfg = ExportConfig(int8=True, ort_opt="basic", min_agreement=0.0, data="digits", check_images=8)
    result = run_export(ModelSource(checkpoint=compressed_vit), cfg, tmp_path / "e")
    out = result.out
    names = {"model.onnx", "model.int8.onnx", "model.ort-basic.onnx", "model.safetensors"}
    assert names <= {p.name for p in out.iterdir()}
    fp32 = [r for r in result.checks if r.file == "model.onnx"]
    assert [r.inputs for r in fp32] == [
        "random batch 1",
        "random batch 7",
        "8 test images of digits",
    ]
    assert all(r.passed and r.max_abs_diff < 1e-5 and r.top1_agreement == 1.0 for r in fp32)
    assert all(r.passed for r in result.checks if r.file == "model.ort-basic.onnx")
    int8 = [r for r in result.checks if r.file == "model.int8.onnx"]
    assert len(int8) == 3 and all(0.0 <= r.top1_agreement <= 1.0 for r in int8)

    # Two MatMuls per factored linear: no MatMul weight shaped like a dense O x I (or I x O).
    loaded = load_model(ModelSource(checkpoint=compressed_vit))
    factored = [m for m in loaded.model.modules() if isinstance(m, FactoredLinear)]
    assert len(factored) == 48
    shapes = onnxio.matmul_weight_shapes(out / "model.onnx")
    for m in factored:
        assert (m.in_features, m.out_features) not in shapes
        assert (m.out_features, m.in_features) not in shapes
        assert (m.in_features, m.rank) in shapes and (m.rank, m.out_features) in shapes

    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["stage"] for s in manifest["stages"]] == ["compress", "export"]
    assert "two MatMuls" in manifest["outputs"]["model.onnx"]
    report = json.loads((out / "report.json").read_text())
    assert len(report["checks"]) == 9
    # The export directory is itself an artifact: factors round-trip bit-exactly.
    x = images(3)
    again = load_model(ModelSource(checkpoint=out)).model
    assert torch.equal(_logits(again, x), _logits(loaded.model, x))


def test_merged_safetensors_load_in_plain_timm(
    compressed_vit: Path,
    tmp_path: Path,
    tiny_spec: Mapping[str, Any],
    images: Callable[..., torch.Tensor],
) -> None:
    cfg = ExportConfig(onnx=False, merge=True)
    out = run_export(ModelSource(checkpoint=compressed_vit), cfg, tmp_path / "m").out
    assert not (out / "model.onnx").exists()
    state = load_file(str(out / "model.safetensors"))
    assert not any(k.endswith((".L", ".R")) for k in state)
    plain = timm.create_model(tiny_spec["arch"], pretrained=False, num_classes=10, img_size=32)
    plain.load_state_dict(state, strict=True)  # no wasi-tool involved
    factored = load_model(ModelSource(checkpoint=compressed_vit)).model
    x = images(4)
    torch.testing.assert_close(_logits(plain, x), _logits(factored, x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_onnx_parity_for_a_compressed_swin(tmp_path: Path) -> None:
    src = ModelSource(random_init=True, arch="swin_tiny_patch4_window7_224", num_classes=10)
    comp = run_compress(src, CompressConfig(targets="mlp", rank_ratio=0.25), tmp_path / "c").out
    result = run_export(ModelSource(checkpoint=comp), ExportConfig(), tmp_path / "e")
    assert [r.inputs for r in result.checks] == ["random batch 1", "random batch 7"]
    assert all(r.passed and r.max_abs_diff < 1e-5 for r in result.checks)


def test_mismatch_beyond_atol_fails_and_writes_nothing(
    compressed_vit: Path, tmp_path: Path
) -> None:
    with pytest.raises(WasiToolError, match="ONNX output differs from torch"):
        run_export(ModelSource(checkpoint=compressed_vit), ExportConfig(atol=1e-12), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"opset": 13}, "opset must be >= 17"),
        ({"onnx": False, "int8": True}, "need the ONNX export"),
        ({"ort_opt": "max"}, "ort_opt must be one of"),
        ({"min_agreement": 1.5}, "min_agreement"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(WasiToolError, match=message):
        ExportConfig(**kwargs)


@pytest.mark.slow
def test_fine_tuned_deit_exports(tmp_path: Path) -> None:
    from wasi_tool.stages import FinetuneConfig, run_finetune

    src = ModelSource(random_init=True, arch="deit_tiny_patch16_224", img_size=32)
    cfg = FinetuneConfig(method="wasi", act_ranks=[4, 3, 8], epochs=1, batch_size=16, max_steps=1)
    tuned = run_finetune(src, "digits", cfg, tmp_path / "ft").out
    result = run_export(ModelSource(checkpoint=tuned), ExportConfig(), tmp_path / "e")
    assert all(r.passed for r in result.checks)
    stages = json.loads((result.out / "manifest.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["compress", "finetune", "export"]
