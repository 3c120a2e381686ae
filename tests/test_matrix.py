"""Every registered method on one tiny model of every family, through ``wasi_tool.prepare``.

Per pair: two steps of the method's own step (``train_step(..., method=...)``) with a finite
loss, back to plain modules with the same eval output, and a save/load round trip through
safetensors with equal outputs. ONNX parity is checked once per family (wasi, the tool's own
method: the factored export). Pairs a method does not support raise WasiToolError; they are
listed in ``UNSUPPORTED`` so that a pair that starts or stops working is noticed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import wasi_tool
from wasi_tool.errors import WasiToolError
from wasi_tool.methods import METHODS, finalize_, get_method
from wasi_tool.nn.subspace import SubspaceLayer
from wasi_tool.training.loop import train_step

from .api.models import TinyViT

CLASSES = 3


def _timm() -> nn.Module:
    from wasi_tool.models.loading import ModelSource, load_model

    kwargs = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    src = ModelSource(
        arch="vit_tiny_patch16_224", img_size=16, random_init=True, num_classes=CLASSES,
        model_kwargs=kwargs,
    )  # fmt: skip
    return load_model(src).model


def _torchvision() -> nn.Module:
    from wasi_tool.models import tv

    return tv.build(
        f"{tv.PREFIX}vit_b_16", num_classes=CLASSES, img_size=16, patch_size=8, embed_dim=32,
        depth=2, num_heads=2,
    )  # fmt: skip


def _hf(model_type: str, **extra: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from wasi_tool.models import hf

        config = {
            "model_type": model_type, "vocab_size": 64, "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 32, "pad_token_id": 0, **extra,
        }  # fmt: skip
        return hf.build({"hf_config": config, "num_classes": CLASSES})

    return build


def _custom() -> nn.Module:
    return TinyViT(img_size=16, patch=8, dim=32, depth=2, heads=2, mlp=48, num_classes=CLASSES)


# family -> (build, input kind)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "timm": (_timm, "images"),
    "torchvision": (_torchvision, "images"),
    "bert": (_hf("bert"), "tokens"),
    "llama": (_hf("llama", num_key_value_heads=2), "tokens"),
    "custom": (_custom, "images"),
}
# BSR plans its blocks from the model family's block list; a user's own nn.TransformerEncoder
# model is no family's (it trains through prepare as a plain module tree)
UNSUPPORTED = {("custom", "bsr"), ("custom", "bsr+wasi")}


def _batch(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if kind == "images":
        x = torch.randn(4, 3, 16, 16, generator=gen)
    else:
        x = torch.randint(3, 64, (4, 8), generator=gen)
    return x, torch.randint(0, CLASSES, (4,), generator=gen)


def _prepare(family: str, method: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    build, _ = FAMILIES[family]
    torch.manual_seed(0)
    spec = get_method(method)
    ranks = (2, 2, 4) if spec.compressed_activations else None
    return wasi_tool.prepare(build(), method, "mlp", act_ranks=ranks, lr=0.01, verbose=False)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_trains_and_returns_to_plain_modules(family: str, tmp_path: Path) -> None:
    x, y = _batch(FAMILIES[family][1])
    refused = set()
    for method in sorted(METHODS):
        if method.startswith("test-"):  # methods other tests register for themselves
            continue
        try:
            model, opt = _prepare(family, method)
        except WasiToolError:
            refused.add((family, method))
            continue
        spec = get_method(method)
        for step in range(2):
            loss = train_step(model, opt, x, y, method=spec, where=f"{method} step {step}").loss
            assert np.isfinite(loss), (family, method)
        model.eval()
        with torch.no_grad():
            trained = model(x)
        finalize_(model, spec)
        assert not any(isinstance(m, SubspaceLayer) for m in model.modules()), method
        with torch.no_grad():
            plain = model(x)
        torch.testing.assert_close(plain, trained, atol=1e-5, rtol=1e-4, msg=method)
        path = tmp_path / f"{method}.safetensors"
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path))
        again = copy.deepcopy(model)
        for p in again.parameters():
            p.data.zero_()
        again.load_state_dict(load_file(str(path)))
        with torch.no_grad():
            torch.testing.assert_close(again(x), plain, msg=method)
    assert refused == {p for p in UNSUPPORTED if p[0] == family}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_factored_export_matches_onnxruntime(family: str, tmp_path: Path) -> None:
    from wasi_tool import onnxio

    x, y = _batch(FAMILIES[family][1])
    model, opt = _prepare(family, "wasi")
    train_step(model, opt, x, y, method=get_method("wasi"))
    finalize_(model, "wasi")
    model.eval()
    kind = FAMILIES[family][1]
    axes = ("batch",) if kind == "images" else ("batch", "seq")
    name = "pixel_values" if kind == "images" else "input_ids"
    path = onnxio.export_onnx(model, x, tmp_path / "m.onnx", input_name=name, dynamic_axes=axes)
    got = onnxio.run(onnxio.session(path), x.numpy())
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())))
