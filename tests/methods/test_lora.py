from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from wasi_tool import artifact
from wasi_tool.errors import WasiToolError
from wasi_tool.methods.lora import apply_lora_, lora_layers, merge_lora_
from wasi_tool.models import ModelSource, load_model
from wasi_tool.stages import FinetuneConfig, run_finetune

TARGETS = [f"blocks.{b}.mlp.{fc}" for b in range(12) for fc in ("fc1", "fc2")]


def test_lora_at_init_leaves_logits_unchanged_and_trains_adapters_and_head(
    images: Callable[..., torch.Tensor], tiny_model: Callable[..., nn.Module]
) -> None:
    model = tiny_model().eval()
    x = images(3)
    ref = model(x)
    apply_lora_(model, TARGETS, rank=4, alpha=8)
    assert lora_layers(model) == TARGETS
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        *(f"{t}.lora_{ab}.default.weight" for t in TARGETS for ab in "AB"),
        "head.weight",
        "head.bias",
    }


def test_lora_merges_exactly(
    images: Callable[..., torch.Tensor], tiny_model: Callable[..., nn.Module]
) -> None:
    model = tiny_model().eval()
    apply_lora_(model, TARGETS[:4], rank=4, alpha=16)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # stand-in for training: non-zero B
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    x = images(3)
    adapted = model(x)
    assert merge_lora_(model) == 4
    assert lora_layers(model) == [] and type(model.get_submodule(TARGETS[0])) is nn.Linear
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(tiny_model().state_dict())


def test_lora_refuses_bad_settings(tiny_model: Callable[..., nn.Module]) -> None:
    with pytest.raises(WasiToolError, match="rank"):
        apply_lora_(tiny_model(), TARGETS, rank=0, alpha=1)
    with pytest.raises(WasiToolError, match=r"nn\.Linear"):
        apply_lora_(tiny_model(), ["blocks.0.mlp"], rank=2, alpha=1)


def test_lora_finetune_writes_a_plain_merged_model(
    tmp_path: Path, tiny_spec: Mapping[str, Any]
) -> None:
    src = ModelSource(random_init=True, arch=tiny_spec["arch"], img_size=32)
    cfg = FinetuneConfig.from_flat(method="lora", lora_rank=4, epochs=1, batch_size=32, max_steps=3)
    metrics = run_finetune(src, "digits", cfg, tmp_path / "lora").metrics.to_dict()
    layer = metrics["analytic"]["layers"][0]
    assert layer["memory_elements"]["weight"] == 768 * 192 + 4 * (768 + 192)
    assert metrics["analytic"]["model"]["trainable_parameters"] == 24 * 4 * (768 + 192) + 1930
    weights = artifact.load_weights(tmp_path / "lora" / "model.safetensors")[0]
    assert not any("lora" in k or "base_layer" in k for k in weights)
    init = load_model(src).model.state_dict()
    # frozen weights stay as they were; the targets moved by the merged adapters
    torch.testing.assert_close(
        weights["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"]
    )
    assert not torch.equal(weights["blocks.0.mlp.fc1.weight"], init["blocks.0.mlp.fc1.weight"])
