"""Factored and WASI layers inside nn.TransformerEncoderLayer / DecoderLayer, train and eval."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wasi_tool
from wasi_tool.nn.factored import FactoredLinear
from wasi_tool.nn.fastpath import fast_paths_given_up
from wasi_tool.nn.subspace import WASILinear
from wasi_tool.transforms.compress import CompressConfig, compress_

from .models import Seq2Seq, TinyViT


def _encoder(nested: bool) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)


def _padded() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 32, generator=gen)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 4:] = True  # left-aligned padding: the nested-tensor path's case
    return x, mask


@pytest.mark.parametrize("nested", [True, False])
def test_factored_encoder_equals_dense_in_train_and_eval(nested: bool) -> None:
    dense = _encoder(nested)
    model = copy.deepcopy(dense)
    report = compress_(model, CompressConfig(targets="*linear1,*linear2", eps=1.0, force=True))
    assert sum(isinstance(m, FactoredLinear) for m in model.modules()) == 4
    assert report is not None
    x, mask = _padded()
    for train in (True, False):
        dense.train(train)
        model.train(train)
        with torch.no_grad():
            for kwargs in ({}, {"src_key_padding_mask": mask}):
                want, got = dense(x, **kwargs), model(x, **kwargs)
                keep = ~mask if kwargs else torch.ones_like(mask)
                # the dense eval fast path zeroes padded rows; compare the real tokens
                torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)
    given_up = fast_paths_given_up(model)
    assert any("layers.0: the fused eval kernel" in line for line in given_up)
    assert any("nested-tensor" in line for line in given_up) == nested


def test_fast_paths_come_back_when_merged() -> None:
    model = _encoder(True)
    before = (model.use_nested_tensor, model.layers[0].activation_relu_or_gelu)
    compress_(model, CompressConfig(targets="*linear1", eps=1.0, force=True))
    assert not model.use_nested_tensor and not model.layers[0].activation_relu_or_gelu
    wasi_tool.merge_(model)
    assert (model.use_nested_tensor, model.layers[0].activation_relu_or_gelu) == before
    assert fast_paths_given_up(model) == []


def test_wasi_inside_encoder_and_decoder_layers_trains_and_evaluates() -> None:
    """nn.Transformer (encoder and decoder layers): at full rank the WASI model's outputs
    and first update equal the dense model's, in train and eval mode."""
    torch.manual_seed(0)
    dense = Seq2Seq().double()
    gen = torch.Generator().manual_seed(2)
    src = torch.randn(4, 6, 32, generator=gen, dtype=torch.float64)
    tgt = torch.randn(4, 5, 32, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 7, (4, 5), generator=gen)
    model, opt = wasi_tool.prepare(
        copy.deepcopy(dense), "wsi", "*linear1,*linear2", eps=1.0, weight_decay=0.0, clip=None
    )
    assert len(model.wasi_prepared.targets) == 4  # encoder and decoder layer, 2 linears each
    ref_opt = torch.optim.SGD(dense.parameters(), lr=0.05)
    for m, o in ((dense, ref_opt), (model, opt)):
        m.train()
        o.zero_grad()
        F.cross_entropy(m(src, tgt).flatten(0, 1), y.flatten()).backward()
        o.step()
    for m in (dense, model):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt), dense(src, tgt), atol=1e-9, rtol=1e-7)


def test_prepare_reports_the_fast_paths_given_up(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = TinyViT()
    x = torch.randn(4, 3, 16, 16)
    with caplog.at_level(logging.INFO, logger="wasi_tool"):
        wasi_tool.prepare(model, "wasi", "mlp", example_input=x)
    assert capsys.readouterr().out == ""  # the report goes to logging, never to stdout
    out = caplog.text
    assert "encoder.layers.1: the fused eval kernel" in out
    assert "given up" in out
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (4, 5)  # eval no longer reads linear1.weight


def test_prepare_memory_mode_block_recomputes_a_plain_models_encoder_layers() -> None:
    """memory_mode="block" on a user's own nn.TransformerEncoder ViT: each encoder layer
    recomputes in backward; fewer bytes saved per step, the same gradients."""
    from wasi_tool.measure import SavedBytesMeter

    torch.manual_seed(0)
    dense = TinyViT().double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    saved, grads = {}, {}
    for mode in ("off", "block"):
        model, _ = wasi_tool.prepare(
            copy.deepcopy(dense), "wasi", "mlp", act_ranks=(2, 4, 8), memory_mode=mode,
            verbose=False,
        )  # fmt: skip
        model.train()
        meter = SavedBytesMeter(model)
        with meter:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        meter.remove()
        saved[mode] = meter.total
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        grads[mode].update(  # the WASI layers' weight gradients stay factored (P, in the sink)
            {f"{n}.P": m.pending_grad.clone() for n, m in model.named_modules()
             if isinstance(m, WASILinear) and m.pending_grad is not None}
        )  # fmt: skip
    assert saved["block"] < saved["off"]
    assert grads["block"].keys() == grads["off"].keys()
    assert sum(k.endswith(".P") for k in grads["off"]) == 4  # linear1, linear2 of 2 layers
    for name, g in grads["off"].items():
        torch.testing.assert_close(grads["block"][name], g, msg=name)
