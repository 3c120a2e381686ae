import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from wasi_tool import artifact
from wasi_tool.errors import WasiToolError
from wasi_tool.models import ModelSource, build_model, load_model
from wasi_tool.nn import FactoredLinear, set_submodule
from wasi_tool.stages import CompressConfig, compress_, run_compress


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize(
    ("arch", "kwargs", "size"),
    [
        ("vit_tiny_patch16_224", {"img_size": 32}, 32),
        ("deit_tiny_patch16_224", {"img_size": 32}, 32),
        ("swin_tiny_patch4_window7_224", {}, 224),
    ],
)
def test_full_rank_factored_logits_equal_original(
    arch: str, kwargs: dict, size: int, images: Callable[..., torch.Tensor]
) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, **kwargs)
    x = images(2, size)
    reference = _logits(model, x)
    report = compress_(model, CompressConfig(targets="all", eps=1.0, force=True))
    assert all(r.status == "factored" and r.rank == r.full_rank for r in report.layers)
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if "blocks" in n)
    torch.testing.assert_close(_logits(model, x), reference, rtol=1e-4, atol=1e-5)


def test_eps_one_without_force_keeps_layers_dense(tiny: nn.Module) -> None:
    report = compress_(tiny, CompressConfig(eps=1.0))
    assert {r.status for r in report.layers} == {"dense: no saving"}
    assert report.model_params_after == report.model_params_before


def test_report_figures(tiny: nn.Module) -> None:
    report = compress_(tiny, CompressConfig(rank_ratio=0.25))
    first = report.layers[0]
    assert (first.name, first.out_features, first.in_features) == ("blocks.0.mlp.fc1", 768, 192)
    assert first.rank == 48 and first.status == "factored"
    assert first.params_before == 768 * 192 + 768
    assert first.params_after == 48 * (768 + 192) + 768
    assert first.flops_before == 2 * 768 * 192 and first.flops_after == 2 * 48 * 960
    assert 0 < first.energy < 1
    layer = tiny.get_submodule("blocks.0.mlp.fc1")
    assert isinstance(layer, FactoredLinear) and layer.rank == 48
    totals = report.totals()
    assert totals["factored"] == 24
    assert totals["model_params_before"] - totals["model_params_after"] == (
        totals["target_params_before"] - totals["target_params_after"]
    )


def test_config_validation() -> None:
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(WasiToolError, match="eps"):
            CompressConfig(eps=bad)
    with pytest.raises(WasiToolError, match="not both"):
        CompressConfig(eps=0.5, rank_ratio=0.5)
    assert CompressConfig().eps == 0.8
    assert CompressConfig.from_dict(CompressConfig(rank_ratio=0.5).to_dict()).rank_ratio == 0.5
    with pytest.raises(WasiToolError, match="unknown compress setting"):
        CompressConfig.from_dict({"epsilon": 0.5})


def test_artifact_round_trip_gives_identical_logits(
    tmp_path: Path,
    tiny_pth: Path,
    tiny_spec: Mapping[str, Any],
    images: Callable[..., torch.Tensor],
) -> None:
    src = ModelSource(checkpoint=tiny_pth, arch=tiny_spec["arch"], img_size=32)
    result = run_compress(
        src, CompressConfig(targets="mlp,attn", eps=0.6), tmp_path / "a", plot=True
    )
    out = result.out
    assert sorted(p.name for p in out.iterdir()) == [
        "energy.png",
        "manifest.json",
        "model.safetensors",
        "report.json",
    ]
    manifest = artifact.read_manifest(out)
    assert manifest["source"]["sha256"] == artifact.sha256_file(tiny_pth)
    assert manifest["model"] == {
        "arch": tiny_spec["arch"],
        "kwargs": {"num_classes": 10, "img_size": 32},
    }
    assert [s["stage"] for s in manifest["stages"]] == ["compress"]
    assert len(manifest["layers"]) == 48
    assert manifest["files"]["model.safetensors"]["sha256"] == artifact.sha256_file(
        out / "model.safetensors"
    )
    _, meta = artifact.load_weights(out / "model.safetensors")
    assert json.loads(meta["stages"])[0]["config"]["eps"] == 0.6
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["layers"] == 48

    x = images(3)
    reloaded = load_model(ModelSource(checkpoint=out))
    torch.testing.assert_close(
        _logits(reloaded.model, x), _logits(result.loaded.model, x), rtol=0, atol=0
    )
    # The safetensors file alone also rebuilds the model (its metadata names the structure).
    alone = load_model(ModelSource(checkpoint=out / "model.safetensors"))
    torch.testing.assert_close(
        _logits(alone.model, x), _logits(result.loaded.model, x), rtol=0, atol=0
    )


def test_compressing_an_artifact_truncates_from_factors(
    tmp_path: Path,
    tiny_pth: Path,
    tiny_spec: Mapping[str, Any],
    images: Callable[..., torch.Tensor],
) -> None:
    src = ModelSource(checkpoint=tiny_pth, arch=tiny_spec["arch"], img_size=32)
    first = run_compress(src, CompressConfig(rank_ratio=0.5), tmp_path / "a")
    second = run_compress(
        ModelSource(checkpoint=first.out), CompressConfig(rank_ratio=0.25), tmp_path / "b"
    )
    assert {r.rank for r in second.report.layers} == {48}
    manifest = artifact.read_manifest(second.out)
    assert [s["config"]["rank_ratio"] for s in manifest["stages"]] == [0.5, 0.25]
    assert manifest["source"]["kind"] == "state-dict"
    assert manifest["source"]["parent"]["path"] == str(first.out)
    # Same result as densifying the rank-96 layers and truncating them to rank 48 by SVD.
    reference = first.loaded.model
    for name, module in list(reference.named_modules()):
        if isinstance(module, FactoredLinear):
            set_submodule(reference, name, module.to_linear())
    compress_(reference, CompressConfig(rank_ratio=0.25))
    x = images()
    torch.testing.assert_close(
        _logits(second.loaded.model, x), _logits(reference, x), rtol=1e-4, atol=1e-5
    )
    third = run_compress(
        ModelSource(checkpoint=second.out), CompressConfig(rank_ratio=0.5), tmp_path / "c"
    )
    assert {r.status for r in third.report.layers} == {"unchanged"}


def test_tampered_artifact_is_rejected(
    tmp_path: Path, tiny_pth: Path, tiny_spec: Mapping[str, Any]
) -> None:
    src = ModelSource(checkpoint=tiny_pth, arch=tiny_spec["arch"], img_size=32)
    out = run_compress(src, CompressConfig(rank_ratio=0.5), tmp_path / "a").out
    blob = bytearray((out / "model.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(WasiToolError, match="does not match its sha256"):
        load_model(ModelSource(checkpoint=out))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WasiToolError, match="format_version 99 is not supported"):
        load_model(ModelSource(checkpoint=out))


def test_failed_write_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_spec: Mapping[str, Any]
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifact.io, "save_weights", boom)
    out = tmp_path / "deep" / "er" / "out"
    src = ModelSource(random_init=True, arch=tiny_spec["arch"], img_size=32)
    with pytest.raises(WasiToolError, match="No space left on device"):
        run_compress(src, CompressConfig(rank_ratio=0.5), out)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path: Path, tiny_spec: Mapping[str, Any]) -> None:
    src = ModelSource(random_init=True, arch=tiny_spec["arch"], img_size=32)
    out = run_compress(src, CompressConfig(rank_ratio=0.5), tmp_path / "a").out
    with pytest.raises(WasiToolError, match="already exists"):
        run_compress(src, CompressConfig(rank_ratio=0.25), out)
    run_compress(src, CompressConfig(rank_ratio=0.25), out, overwrite=True)
    assert artifact.read_manifest(out)["stages"][0]["config"]["rank_ratio"] == 0.25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging left over


def test_random_init_is_seeded(
    tiny_spec: Mapping[str, Any],
    images: Callable[..., torch.Tensor],
    tiny_model: Callable[..., nn.Module],
) -> None:
    a = load_model(ModelSource(random_init=True, arch=tiny_spec["arch"], img_size=32, seed=3)).model
    b = load_model(ModelSource(random_init=True, arch=tiny_spec["arch"], img_size=32, seed=3)).model
    x = images()
    torch.testing.assert_close(_logits(a, x), _logits(b, x), rtol=0, atol=0)
    assert not torch.equal(_logits(a, x), _logits(tiny_model(seed=4), x))
