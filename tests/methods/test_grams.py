"""calibrate_grams: streamed input Gram matrices equal the dense X^T X, in constant memory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.measure import LiveTensorMeter
from wasi_tool.methods.calibrate import calibrate_grams, capture


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.5), nn.Linear(16, 5))


def _batches(count: int, seed: int = 0) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield torch.randn(4, 3, 6, generator=gen)  # (batch, tokens, features)


def test_grams_equal_the_dense_reference_and_modes_are_restored() -> None:
    net = _net().train()
    grams = calibrate_grams(net, ["0", "3"], _batches(5))
    assert net.training  # restored
    xs = torch.cat([b.reshape(-1, 6) for b in _batches(5)]).double()
    torch.testing.assert_close(grams["0"].matrix, xs.T @ xs)
    assert grams["0"].rows == 5 * 4 * 3 and grams["0"].matrix.dtype == torch.float64
    net.eval()
    hidden = torch.cat([net[1](net[0](b)).reshape(-1, 16) for b in _batches(5)]).double()
    torch.testing.assert_close(grams["3"].matrix, hidden.T @ hidden)  # eval: no dropout
    assert not net[0]._forward_pre_hooks  # the hooks are gone


def test_row_mask_leaves_rows_out() -> None:
    net = _net()
    x = next(_batches(1))
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[:, :2] = True  # the last token of each sample is padding
    grams = calibrate_grams(net, ["0"], [(x, mask)])
    kept = x[:, :2].reshape(-1, 6).double()
    torch.testing.assert_close(grams["0"].matrix, kept.T @ kept)
    assert grams["0"].rows == 8
    with pytest.raises(WasiToolError, match="row mask"):
        calibrate_grams(net, ["0"], [(x, mask[:, :1])])
    with pytest.raises(WasiToolError, match="not a linear"):
        calibrate_grams(net, ["1"], [x])


def _peak(fn: object, count: int) -> int:
    with LiveTensorMeter() as meter:
        fn(_batches(count))  # type: ignore[operator]
    return meter.peak


def test_peak_memory_does_not_grow_with_the_number_of_batches() -> None:
    net = _net()

    def streamed(batches: Iterator[torch.Tensor]) -> None:
        calibrate_grams(net, ["0", "3"], batches)

    few, many = _peak(streamed, 2), _peak(streamed, 40)
    assert many == few

    # the meter can fail: keeping every batch's inputs (what capture returns) grows with N
    def kept(batches: Iterator[torch.Tensor]) -> None:
        store = [capture(net, ["0", "3"], b) for b in batches]
        assert store

    assert _peak(kept, 40) > 4 * _peak(kept, 2)
