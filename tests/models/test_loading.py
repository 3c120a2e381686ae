from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.models import ModelSource, load_model


def _source(path: Path | None, **kw: object) -> ModelSource:
    return ModelSource(checkpoint=path, **kw)  # type: ignore[arg-type]


@pytest.fixture
def same_logits(images: Callable[..., torch.Tensor]) -> Callable[[nn.Module, nn.Module], None]:
    def check(a: nn.Module, b: nn.Module) -> None:
        x = images()
        with torch.no_grad():
            torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)

    return check


def test_state_dict_pth_with_arch(
    tiny: nn.Module,
    tiny_pth: Path,
    tiny_spec: Mapping[str, Any],
    same_logits: Callable[[nn.Module, nn.Module], None],
) -> None:
    loaded = load_model(_source(tiny_pth, arch=tiny_spec["arch"], img_size=32))
    assert loaded.arch == tiny_spec["arch"]
    assert loaded.model_kwargs == {"num_classes": 10, "img_size": 32}  # classes read from head
    assert loaded.source["kind"] == "state-dict" and len(loaded.source["sha256"]) == 64
    same_logits(loaded.model, tiny)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_checkpoint_naming_its_arch_needs_no_arch(
    tmp_path: Path,
    tiny: nn.Module,
    wrapper: str,
    tiny_spec: Mapping[str, Any],
    same_logits: Callable[[nn.Module, nn.Module], None],
) -> None:
    path = tmp_path / "ckpt.pt"
    sd = {f"module.{k}": v for k, v in tiny.state_dict().items()}  # DataParallel prefix
    torch.save({wrapper: sd, "arch": tiny_spec["arch"], "epoch": 3}, path)
    loaded = load_model(_source(path, img_size=32))
    same_logits(loaded.model, tiny)


def test_plain_safetensors(
    tmp_path: Path,
    tiny: nn.Module,
    tiny_spec: Mapping[str, Any],
    same_logits: Callable[[nn.Module, nn.Module], None],
) -> None:
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    with pytest.raises(WasiToolError, match="pass --arch"):
        load_model(_source(path, img_size=32))
    same_logits(load_model(_source(path, arch=tiny_spec["arch"], img_size=32)).model, tiny)


def test_weights_for_another_arch(tiny_pth: Path) -> None:
    with pytest.raises(WasiToolError, match="weights do not fit deit_small_patch16_224"):
        load_model(_source(tiny_pth, arch="deit_small_patch16_224", img_size=32))


def test_wrong_img_size_is_a_shape_mismatch(tiny_pth: Path, tiny_spec: Mapping[str, Any]) -> None:
    with pytest.raises(WasiToolError, match=r"shape mismatch \(pos_embed"):
        load_model(_source(tiny_pth, arch=tiny_spec["arch"]))


def test_unknown_arch_suggests(tiny_pth: Path) -> None:
    with pytest.raises(WasiToolError, match="did you mean vit_tiny_patch16_224"):
        load_model(_source(tiny_pth, arch="vit_tiny_patch16_22"))


def test_missing_file_and_bad_suffix(tmp_path: Path, tiny_spec: Mapping[str, Any]) -> None:
    with pytest.raises(WasiToolError, match="no such file"):
        load_model(_source(tmp_path / "nope.pth", arch=tiny_spec["arch"]))
    odd = tmp_path / "w.npy"
    odd.write_bytes(b"123")
    with pytest.raises(WasiToolError, match="unsupported checkpoint"):
        load_model(_source(odd, arch=tiny_spec["arch"]))
    with pytest.raises(WasiToolError, match="not a wasi-tool artifact"):
        load_model(_source(tmp_path, arch=tiny_spec["arch"]))


def test_corrupt_files(tmp_path: Path, tiny: nn.Module, tiny_spec: Mapping[str, Any]) -> None:
    good = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(good))
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WasiToolError, match="cannot read safetensors"):
        load_model(_source(truncated, arch=tiny_spec["arch"], img_size=32))
    garbage = tmp_path / "g.pt"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(WasiToolError, match="not a PyTorch file, or corrupt"):
        load_model(_source(garbage, arch=tiny_spec["arch"]))


def test_pickled_module_needs_trust(
    tmp_path: Path,
    tiny: nn.Module,
    tiny_spec: Mapping[str, Any],
    same_logits: Callable[[nn.Module, nn.Module], None],
) -> None:
    path = tmp_path / "whole.pt"
    torch.save(tiny, path)
    with pytest.raises(WasiToolError, match="--trust-pickle"):
        load_model(_source(path))
    loaded = load_model(_source(path, trust_pickle=True, img_size=32))
    assert loaded.arch == tiny_spec["arch"] and loaded.source["kind"] == "pickled-module"
    same_logits(loaded.model, tiny)


def test_non_tensor_entries_need_trust(
    tmp_path: Path, tiny: nn.Module, tiny_spec: Mapping[str, Any]
) -> None:
    import argparse

    path = tmp_path / "train.pth.tar".replace(".tar", "")
    torch.save({"state_dict": tiny.state_dict(), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(WasiToolError, match=r"argparse\.Namespace"):
        load_model(_source(path, arch=tiny_spec["arch"], img_size=32))


def test_random_init_needs_arch() -> None:
    with pytest.raises(WasiToolError, match="--random-init needs --arch"):
        load_model(ModelSource(random_init=True))
    with pytest.raises(WasiToolError, match="no checkpoint given"):
        load_model(ModelSource())


def test_model_kwargs_build_a_variant_that_artifacts_rebuild(
    tmp_path: Path, tiny_spec: Mapping[str, Any]
) -> None:
    from wasi_tool.stages import CompressConfig, run_compress

    kwargs = {"patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}
    src = ModelSource(random_init=True, arch=tiny_spec["arch"], img_size=32, model_kwargs=kwargs)
    loaded = load_model(src)
    assert loaded.model.patch_embed.num_patches == 64 and len(loaded.model.blocks) == 2
    assert loaded.model_kwargs == {"num_classes": 1000, "img_size": 32, **kwargs}
    out = run_compress(src, CompressConfig(targets="mlp", rank_ratio=0.5), tmp_path / "c").out
    again = load_model(ModelSource(checkpoint=out))
    assert len(again.model.blocks) == 2
    assert again.model_kwargs == loaded.model_kwargs
    with pytest.raises(WasiToolError, match="unsupported model_kwargs"):
        load_model(ModelSource(random_init=True, arch=tiny_spec["arch"], model_kwargs={"act": 1}))
