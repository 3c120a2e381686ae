import copy
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
import torch.nn.functional as F

from wasi_tool import artifact
from wasi_tool.errors import WasiToolError
from wasi_tool.methods import bsr
from wasi_tool.models import ModelSource, load_model
from wasi_tool.models.registry import build_model
from wasi_tool.nn import token_drop
from wasi_tool.stages import FinetuneConfig, run_finetune
from wasi_tool.stages.export import ExportConfig, run_export


@pytest.fixture
def src(tiny_spec: Mapping[str, Any]) -> ModelSource:
    return ModelSource(random_init=True, arch=tiny_spec["arch"], img_size=32)


def test_vit_b16_token_counts_197_100_52_28() -> None:
    torch.manual_seed(0)
    model = build_model("vit_base_patch16_224", num_classes=10).eval()
    plan = bsr.plan_bsr(model, keep_rate=0.5, fuse=True)
    assert (plan.trained, plan.drop_at) == ([3, 7, 11], [3, 6, 9])  # the paper's defaults
    bsr.apply_bsr_(model, plan)
    counts = bsr.tokens_per_block(model, torch.randn(1, 3, 224, 224))
    assert counts == [197] * 4 + [100] * 3 + [52] * 3 + [28] * 2
    # without fusing, one token fewer after each drop: 197 -> 99 -> 50 -> 26
    unfused = bsr.plan_bsr(model, keep_rate=0.5, fuse=False)
    bsr.enable_token_drop_(model, {plan.blocks[i]: (0.5, False) for i in unfused.drop_at})
    counts = bsr.tokens_per_block(model, torch.randn(1, 3, 224, 224))
    assert counts == [197] * 4 + [99] * 3 + [50] * 3 + [26] * 2


def test_defaults_scale_with_depth(tiny_model: Callable[..., torch.nn.Module]) -> None:
    assert bsr.default_indices(12, bsr.PAPER_BLOCKS) == [3, 7, 11]
    assert bsr.default_indices(6, bsr.PAPER_BLOCKS) == [1, 3, 5]
    assert bsr.default_indices(24, bsr.PAPER_DROP_AT) == [6, 12, 18]
    with pytest.raises(WasiToolError, match="out of range"):
        bsr.plan_bsr(tiny_model(), trained=[12])
    with pytest.raises(WasiToolError, match="keep_rate"):
        bsr.plan_bsr(tiny_model(), keep_rate=0.0)


def test_keep_all_tokens_is_the_plain_block(
    images: Callable[..., torch.Tensor], tiny_model: Callable[..., torch.nn.Module]
) -> None:
    """keep_rate 1 runs the replicated attention path and must equal timm's own block."""
    model = tiny_model().eval()
    x = images(3)
    ref = model(x)
    dropping = copy.deepcopy(model)
    bsr.enable_token_drop_(dropping, {f"blocks.{i}": (1.0, True) for i in range(12)})
    assert set(dropping.state_dict()) == set(model.state_dict())  # same keys
    torch.testing.assert_close(dropping(x), ref)


def test_drop_tokens_keeps_the_top_and_fuses_the_rest() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 4, generator=gen)
    attn = torch.rand(2, 8, generator=gen)
    out = token_drop.drop_tokens(x, attn, 0.5, fuse=True)
    assert out.shape == (2, 1 + 4 + 1, 4)
    for b in range(2):
        order = sorted(range(8), key=lambda j: -float(attn[b, j]))
        kept, rest = order[:4], order[4:]
        torch.testing.assert_close(out[b, 0], x[b, 0])
        torch.testing.assert_close(out[b, 1:5], x[b, 1:][kept])
        w = attn[b, rest]
        fused = (x[b, 1:][rest] * w[:, None]).sum(0) / w.sum()
        torch.testing.assert_close(out[b, 5], fused)
    assert token_drop.drop_tokens(x, attn, 0.5, fuse=False).shape == (2, 5, 4)
    assert token_drop.kept_tokens(196, 0.5) == 98 and token_drop.kept_tokens(3, 0.5) == 2


def test_swin_gets_block_selection_only() -> None:
    model = build_model("swin_tiny_patch4_window7_224", num_classes=10)
    plan = bsr.plan_bsr(model)
    assert plan.drop_at == [] and "block selection only" in plan.notes[0]
    assert plan.trained_names == ["layers.1.blocks.1", "layers.2.blocks.3", "layers.3.blocks.1"]
    assert bsr.trainable_names(model, plan)[-2:] == ["norm", "head.fc"]


def _saved_per_block(model: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Tensors autograd saves while each block runs its forward."""
    counts: dict[str, int] = {}
    current: list[str] = []
    for name in bsr.find_blocks(model):
        block = model.get_submodule(name)
        block.register_forward_pre_hook(lambda m, a, n=name: current.append(n))
        block.register_forward_hook(lambda m, a, o: current.pop() and None)
        counts[name] = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        if current:
            counts[current[-1]] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    return counts


def test_frozen_parameters_get_no_gradient_and_early_blocks_save_nothing(
    images: Callable[..., torch.Tensor], tiny_model: Callable[..., torch.nn.Module]
) -> None:
    model = tiny_model().train()
    plan = bsr.plan_bsr(model, trained=[3, 7, 11], drop_at=[3, 6, 9])
    trained = bsr.apply_bsr_(model, plan)
    assert trained == ["blocks.3", "blocks.7", "blocks.11", "norm", "head"]
    saved = _saved_per_block(model, images(4))
    assert all(saved[f"blocks.{i}"] == 0 for i in range(3))
    assert all(saved[f"blocks.{i}"] > 0 for i in range(3, 12))  # backprop passes through them
    for name, p in model.named_parameters():
        inside = any(name.startswith(f"{m}.") for m in trained)
        assert (p.grad is not None) == inside, name


def _finetune(src: ModelSource, tmp_path: Path, name: str, **kw: Any) -> dict[str, Any]:
    cfg = FinetuneConfig.from_flat(epochs=1, batch_size=32, max_steps=3, **kw)
    return run_finetune(src, "digits", cfg, tmp_path / name).metrics.to_dict()


def test_bsr_wasi_at_full_rank_equals_bsr(
    tmp_path: Path, src: ModelSource, images: Callable[..., torch.Tensor]
) -> None:
    common: dict[str, Any] = {"bsr_blocks": [3, 7, 11], "drop_at": [3, 6, 9], "keep_rate": 0.5}
    plain = _finetune(src, tmp_path, "bsr", method="bsr", **common)
    full = _finetune(
        src, tmp_path, "both", method="bsr+wasi", eps=1.0, act_ranks=[64, 64, 4096], **common
    )
    assert (
        full["targets"]
        == plain["targets"]
        == [f"blocks.{b}.mlp.{fc}" for b in (3, 7, 11) for fc in ("fc1", "fc2")]
    )
    assert full["analytic"]["model"]["tokens_per_block"] == [5] * 4 + [4] * 8
    a = load_model(ModelSource(checkpoint=tmp_path / "bsr")).model
    b = load_model(ModelSource(checkpoint=tmp_path / "both")).model
    for name in plain["targets"]:
        torch.testing.assert_close(
            b.get_submodule(name).to_linear().weight,  # type: ignore[operator]
            a.get_submodule(name).weight,
            atol=2e-5,
            rtol=1e-4,
        )
    wa, wb = a.state_dict(), b.state_dict()
    for key in (
        "blocks.3.attn.qkv.weight",
        "head.weight",
        "norm.weight",
        "blocks.0.mlp.fc1.weight",
    ):
        torch.testing.assert_close(wb[key], wa[key], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(b(images(3)), a(images(3)), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_bsr_artifact_keeps_dropping_and_exports_it_to_onnx(
    tmp_path: Path, src: ModelSource, images: Callable[..., torch.Tensor]
) -> None:
    metrics = _finetune(src, tmp_path, "bsr", method="bsr")
    assert metrics["bsr"]["trained_blocks"] == [3, 7, 11]
    meta = artifact.load_weights(tmp_path / "bsr" / "model.safetensors")[1]
    assert "blocks.3" in meta["token_drop"]
    loaded = load_model(ModelSource(checkpoint=tmp_path / "bsr"))
    assert isinstance(loaded.model.get_submodule("blocks.6"), token_drop.TokenDropBlock)
    assert bsr.tokens_per_block(loaded.model, images(1))[-1] == 4
    # the export stage checks ORT against torch (batch 1, 7, real images) and fails beyond atol
    src = ModelSource(checkpoint=tmp_path / "bsr")
    result = run_export(src, ExportConfig(onnx=True, data="digits"), tmp_path / "ex")
    assert len(result.checks) == 3 and all(r.max_abs_diff < 1e-4 for r in result.checks)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "ex" / "model.onnx")).graph.node]
    assert ops.count("TopK") == 3 and "GatherElements" in ops
    assert math.isfinite(metrics["final"]["test_accuracy"])


def test_bsr_needs_targets_inside_the_trained_blocks(tmp_path: Path, src: ModelSource) -> None:
    with pytest.raises(WasiToolError, match="inside the trained blocks"):
        _finetune(src, tmp_path, "x", method="bsr", targets="blocks.0.*", bsr_blocks=[5])
