from collections.abc import Callable

import pytest
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.models import build_model, select_targets


@pytest.fixture(scope="module")
def vit(tiny_model: Callable[..., nn.Module]) -> nn.Module:
    return tiny_model()


def test_presets_on_vit(vit: nn.Module) -> None:
    mlp = select_targets(vit, "mlp")
    assert len(mlp) == 24 and mlp[:2] == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    attn = select_targets(vit, "attn")
    assert len(attn) == 24 and attn[:2] == ["blocks.0.attn.qkv", "blocks.0.attn.proj"]
    everything = select_targets(vit, "all")
    assert len(everything) == 48 and "head" not in everything


def test_head_only_when_named_exactly(vit: nn.Module) -> None:
    assert "head" not in select_targets(vit, "*head*,blocks.0.mlp.fc1")
    assert select_targets(vit, "head") == ["head"]


def test_globs_and_exclude(vit: nn.Module) -> None:
    assert select_targets(vit, "blocks.1[01].mlp.*") == [
        "blocks.10.mlp.fc1",
        "blocks.10.mlp.fc2",
        "blocks.11.mlp.fc1",
        "blocks.11.mlp.fc2",
    ]
    chosen = select_targets(vit, "mlp,attn", exclude=["blocks.0.*", "*fc2"])
    assert len(chosen) == 11 * 2 + 11
    assert not any(n.startswith("blocks.0.") or n.endswith("fc2") for n in chosen)


def test_no_match_is_a_clear_error(vit: nn.Module) -> None:
    with pytest.raises(WasiToolError, match="no linear layer matches"):
        select_targets(vit, "decoder.*")


def test_swin_presets() -> None:
    swin = build_model("swin_tiny_patch4_window7_224", num_classes=5)
    assert len(select_targets(swin, "mlp")) == 24  # 2 + 2 + 6 + 2 blocks
    assert "head.fc" not in select_targets(swin, "all")
