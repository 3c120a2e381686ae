"""torchvision's ViT and Swin as archs ``torchvision:<name>``: built offline, loaded from
torchvision state dicts, equal to torchvision's own models, and first-class in every method."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from wasi_tool import CompressConfig, compress_
from wasi_tool.data.datasets import BatchTransform
from wasi_tool.errors import WasiToolError
from wasi_tool.methods import bsr
from wasi_tool.models import ModelSource, load_model, select_targets, tv
from wasi_tool.models.families import family_of
from wasi_tool.models.registry import build_model
from wasi_tool.nn.attention import SelfAttention
from wasi_tool.nn.recompute import recomputed
from wasi_tool.nn.token_drop import TorchvisionTokenDropBlock, drop_tokens
from wasi_tool.training.config import FinetuneConfig
from wasi_tool.training.prepare import prepare_for_training
from wasi_tool.transforms import merge_

# A small ViT of torchvision's class: 16 px, 8-px patches (4 patches + CLS), width 32.
VIT_KW = {"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0}
VIT_TV = {"patch_size": 8, "hidden_dim": 32, "num_layers": 4, "num_heads": 2, "mlp_dim": 64}
# Swin-T's depths with a narrow width (1 head in the first stage: widths 16, 32, 64, 128).
SWIN_KW = {"embed_dim": 16, "num_heads": 1}
SWIN_TV = {"embed_dim": 16, "depths": [2, 2, 6, 2], "num_heads": [1, 2, 4, 8]}
SWIN_T_DROP_PATH = 0.2  # torchvision's swin_t builder's stochastic_depth_prob


def _ref_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=16, num_classes=5, **VIT_TV)  # type: ignore[arg-type]
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision's head starts at zero
    return model.eval()


def _ref_swin(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SwinTransformer(
        patch_size=[4, 4],
        window_size=[7, 7],
        num_classes=5,
        stochastic_depth_prob=SWIN_T_DROP_PATH,
        **SWIN_TV,  # type: ignore[arg-type]
    ).eval()


def _load(tmp_path: Path, ref: nn.Module, arch: str, kw: dict[str, object]) -> nn.Module:
    path = tmp_path / "ref.pth"
    torch.save(ref.state_dict(), path)
    src = ModelSource(checkpoint=path, arch=arch, img_size=16 if "vit" in arch else 32)
    src.model_kwargs = dict(kw)
    return load_model(src).model


def _x(batch: int = 3, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_loads_torchvision_state_dicts_and_equals_them(tmp_path: Path, kind: str) -> None:
    ref = _ref_vit() if kind == "vit" else _ref_swin()
    arch, kw = (
        ("torchvision:vit_b_32", VIT_KW) if kind == "vit" else ("torchvision:swin_t", SWIN_KW)
    )
    model = _load(tmp_path, ref, arch, kw)
    assert family_of(model).name == "torchvision"
    assert list(model.state_dict()) == list(ref.state_dict())  # torchvision's names, in order
    x = _x(size=16 if kind == "vit" else 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    # training mode (the MHA slow path), gradients too
    model.train(), ref.train()
    for m in (model, ref):
        m.zero_grad()
        torch.manual_seed(3)
        m(x).square().sum().backward()
    theirs = dict(ref.named_parameters())
    ours = model.state_dict(keep_vars=True)
    for name, p in theirs.items():
        assert p.grad is not None
        torch.testing.assert_close(ours[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_self_attention_equals_multihead_attention() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    ours = SelfAttention.from_mha(copy.deepcopy(mha))
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], mha(x, x, x)[0])
    assert set(ours.state_dict()) == set(mha.state_dict())  # in_proj_weight, not in_proj.weight
    with pytest.raises(WasiToolError, match="need_weights"):
        ours(x, x, x, need_weights=True)
    with pytest.raises(WasiToolError, match="self-attention"):
        ours(x, torch.randn(2, 5, 16), x)
    _, cls = ours.forward_with_cls(x)
    _, weights = mha(x, x, x, need_weights=True, average_attn_weights=True)
    torch.testing.assert_close(cls, weights[:, 0, 1:])


def test_presets_name_the_mlp_and_attention_linears() -> None:
    vit = build_model("torchvision:vit_b_16", num_classes=3, img_size=32)
    blk = "encoder.layers.encoder_layer_0"
    assert select_targets(vit, "mlp")[:2] == [f"{blk}.mlp.0", f"{blk}.mlp.3"]
    # attn: the packed q/k/v projection (an nn.Linear here, MHA's in_proj_weight) + out_proj
    attn = select_targets(vit, "attn")
    assert attn[:2] == [f"{blk}.self_attention.in_proj", f"{blk}.self_attention.out_proj"]
    assert len(attn) == 24 and "heads.head" not in select_targets(vit, "all")
    last = select_targets(vit, "mlp@last1")
    assert last == [
        "encoder.layers.encoder_layer_11.mlp.0",
        "encoder.layers.encoder_layer_11.mlp.3",
    ]
    swin = build_model("torchvision:swin_t", num_classes=3)
    assert select_targets(swin, "mlp")[:2] == ["features.1.0.mlp.0", "features.1.0.mlp.3"]
    assert select_targets(swin, "attn")[:2] == ["features.1.0.attn.qkv", "features.1.0.attn.proj"]
    assert len(family_of(swin).blocks(swin)) == 12 and family_of(swin).norms(swin) == ["norm"]


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_full_rank_compression_keeps_the_logits_and_merges_back(tmp_path: Path, kind: str) -> None:
    ref = _ref_vit() if kind == "vit" else _ref_swin()
    arch, kw = (
        ("torchvision:vit_b_32", VIT_KW) if kind == "vit" else ("torchvision:swin_t", SWIN_KW)
    )
    model = _load(tmp_path, ref, arch, kw)
    report = compress_(model, CompressConfig(targets="mlp,attn", rank_ratio=1.0, force=True))
    assert len(report.layers) == (16 if kind == "vit" else 48)
    x = _x(size=16 if kind == "vit" else 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-4)
        state = model.state_dict()
        if kind == "vit":  # a factored in_proj saves under its own names
            assert "encoder.layers.encoder_layer_0.self_attention.in_proj.L" in state
        merge_(model)
        back = copy.deepcopy(ref)
        back.load_state_dict(model.state_dict())  # torchvision's names again
        torch.testing.assert_close(back(x), ref(x), atol=1e-5, rtol=1e-4)


def test_new_head_and_preprocessing() -> None:
    vit = build_model("torchvision:vit_b_32", num_classes=1000, img_size=64)
    vit.reset_classifier(7)  # type: ignore[operator]
    assert vit.heads.head.out_features == 7 and vit.num_classes == 7
    assert family_of(vit).heads(vit) == {"heads.head"}
    spec = family_of(vit).input_spec(vit, {"img_size": 64})
    assert (spec.size, spec.resize, spec.interpolation) == (64, 73, "bilinear")  # 256/224 scaled
    with torch.device("meta"):  # no weights needed for the input spec
        swin = build_model("torchvision:swin_b")
    spec = family_of(swin).input_spec(swin, {})
    assert (spec.size, spec.resize, spec.interpolation) == (224, 238, "bicubic")
    assert tv.preprocessing("torchvision:vit_l_16")["resize"] == 242
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))


def test_resize_and_crop_match_torchvision_transforms() -> None:
    from torchvision.models import Swin_T_Weights

    coarse = torch.rand(2, 3, 10, 9, generator=torch.Generator().manual_seed(0))
    smooth = nn.functional.interpolate(coarse, size=(300, 260), mode="bilinear") * 255
    images = smooth.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    ours = BatchTransform(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 232, "bicubic")
    theirs = Swin_T_Weights.IMAGENET1K_V1.transforms()(images.permute(0, 3, 1, 2))
    torch.testing.assert_close(ours(images), theirs, atol=2e-2, rtol=0)  # uint8 vs float resize
    assert ours(images).shape == (2, 3, 224, 224)


def test_unknown_names_are_one_line_errors() -> None:
    with pytest.raises(WasiToolError, match="did you mean torchvision:vit_b_32"):
        build_model("torchvision:vit_b_33")
    with pytest.raises(WasiToolError, match="did you mean torchvision:swin_t"):
        build_model("swin_t")
    with pytest.raises(WasiToolError, match="does not take depth"):
        build_model("torchvision:swin_t", depth=3)


def test_vit_token_dropping_equals_the_reference(tmp_path: Path) -> None:
    ref = _ref_vit()
    model = _load(tmp_path, ref, "torchvision:vit_b_32", VIT_KW)
    plan = bsr.plan_bsr(model, trained=[1, 3], drop_at=[1], keep_rate=0.5)
    assert plan.drop_at == [1] and not plan.notes
    bsr.apply_bsr_(model, plan)
    block = model.get_submodule("encoder.layers.encoder_layer_1")
    assert isinstance(block, TorchvisionTokenDropBlock)
    assert bsr.tokens_per_block(model, _x(1)) == [5, 5, 4, 4]  # CLS + 2 kept + 1 fused
    # reference: torchvision's block with nn.MultiheadAttention's averaged weights
    rb = ref.encoder.layers.encoder_layer_1
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        h = rb.ln_1(x)
        out, weights = rb.self_attention(h, h, h, need_weights=True, average_attn_weights=True)
        y = drop_tokens(x + out, weights[:, 0, 1:], 0.5, True)
        expected = y + rb.mlp(rb.ln_2(y))
        torch.testing.assert_close(block(x), expected)


def test_swin_gets_block_selection_only_and_refuses_drop_at() -> None:
    swin = build_model("torchvision:swin_t", num_classes=3)
    plan = bsr.plan_bsr(swin)
    assert plan.drop_at == [] and "windowed attention" in plan.notes[0]
    assert plan.trained_names == ["features.3.1", "features.5.3", "features.7.1"]
    assert bsr.trainable_names(swin, plan)[-2:] == ["norm", "head"]
    with pytest.raises(WasiToolError, match=r"cannot drop tokens .*windowed attention"):
        bsr.plan_bsr(swin, drop_at=[3])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_memory_mode_recomputes_their_blocks_exactly(tmp_path: Path, kind: str) -> None:
    ref = _ref_vit() if kind == "vit" else _ref_swin()
    arch, kw = (
        ("torchvision:vit_b_32", VIT_KW) if kind == "vit" else ("torchvision:swin_t", SWIN_KW)
    )
    base = _load(tmp_path, ref, arch, kw)
    x, y = _x(4, 16 if kind == "vit" else 32), torch.arange(4) % 5
    grads = []
    for mode in ("off", "block", "mlp", "attn"):
        model = copy.deepcopy(base)
        cfg = FinetuneConfig(method="wasi", act_ranks=[2, 3, 8], memory_mode=mode, eps=0.9)
        prepared = prepare_for_training(model, cfg, lambda t: ({n: (2, 3, 8) for n in t}, None))
        assert prepared.targets
        expected = {"off": 0, "block": 4 if kind == "vit" else 12}.get(mode)
        count = len(recomputed(model))
        assert (
            count == expected
            if expected is not None
            else count == len(family_of(model).blocks(model))
        )
        model.train()
        torch.manual_seed(5)  # the same drop-path masks in every run
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for other in grads[1:]:
        assert other.keys() == grads[0].keys() and grads[0]
        for name, g in grads[0].items():
            torch.testing.assert_close(other[name], g, atol=1e-6, rtol=1e-5, msg=name)
