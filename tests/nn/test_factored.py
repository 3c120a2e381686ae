import pytest
import torch
from torch import nn

from wasi_tool.nn import FactoredLinear


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_forward_equals_linear(bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(24, 40, bias=bias)
    fl = FactoredLinear.from_linear(linear, rank=24)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(fl(x), linear(x))
    assert {n for n, _ in fl.named_parameters()} == ({"L", "R", "bias"} if bias else {"L", "R"})


def test_holds_no_dense_weight() -> None:
    fl = FactoredLinear.from_linear(nn.Linear(64, 128), rank=8)
    shapes = [tuple(t.shape) for t in [*fl.parameters(), *fl.buffers()]]
    assert shapes == [(128, 8), (8, 64), (128,)]
    assert "rank=8" in repr(fl)


def test_truncated_from_factors_equals_truncating_the_dense_layer() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(32, 48)
    x = torch.randn(4, 32)
    wide = FactoredLinear.from_linear(linear, rank=20)
    narrow_direct = FactoredLinear.from_linear(wide.to_linear(), rank=6)
    narrow = wide.truncated(6)
    torch.testing.assert_close(narrow(x), narrow_direct(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(narrow.L.T @ narrow.L, torch.eye(6), atol=1e-5, rtol=0)


def test_to_linear_round_trip() -> None:
    torch.manual_seed(0)
    fl = FactoredLinear.from_linear(nn.Linear(16, 12), rank=5)
    x = torch.randn(7, 16)
    torch.testing.assert_close(fl.to_linear()(x), fl(x))


def test_rank_out_of_range() -> None:
    with pytest.raises(ValueError):
        FactoredLinear(8, 4, rank=5)
    with pytest.raises(ValueError, match="differ in K"):
        FactoredLinear.from_factors(torch.zeros(4, 2), torch.zeros(3, 8))


def test_from_factors_copies() -> None:
    left, right, bias = torch.randn(6, 2), torch.randn(2, 5), torch.randn(6)
    fl = FactoredLinear.from_factors(left, right, bias)
    x = torch.randn(3, 5)
    torch.testing.assert_close(fl(x), x @ right.T @ left.T + bias)
    left.zero_()
    assert fl.L.abs().sum() > 0
