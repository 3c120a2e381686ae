import math

import pytest
import torch

from wasi_tool.errors import WasiToolError
from wasi_tool.ops import (
    breakeven_rank,
    energy_curve,
    rank_by_energy,
    rank_by_ratio,
    saves_flops,
)


def test_eps_one_keeps_full_rank() -> None:
    s = torch.linalg.svdvals(torch.randn(64, 40, dtype=torch.float64))
    assert rank_by_energy(s, 1.0) == 40


def test_tiny_eps_gives_rank_one() -> None:
    s = torch.linalg.svdvals(torch.randn(64, 40))
    assert rank_by_energy(s, 1e-9) == 1


def test_eps_one_on_rank_deficient_matrix_gives_its_rank() -> None:
    w = torch.randn(30, 5, dtype=torch.float64) @ torch.randn(5, 20, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    s[5:] = 0.0  # exact zeros: the energy rule must stop at the true rank
    assert rank_by_energy(s, 1.0) == 5


def test_known_spectrum_thresholds() -> None:
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9/14, 13/14, 14/14
    curve = energy_curve(s)
    assert curve[-1].item() == 1.0
    torch.testing.assert_close(curve, torch.tensor([9 / 14, 13 / 14, 1.0], dtype=torch.float64))
    assert rank_by_energy(s, 0.5) == 1
    assert rank_by_energy(s, 9 / 14 + 1e-9) == 2
    assert rank_by_energy(s, 0.9) == 2
    assert rank_by_energy(s, 0.95) == 3


def test_zero_spectrum_gives_rank_one() -> None:
    assert rank_by_energy(torch.zeros(8), 0.9) == 1


@pytest.mark.parametrize("eps", [0.0, -0.1, 1.5, math.nan, math.inf, "abc", None])
def test_eps_outside_unit_interval_is_rejected(eps: object) -> None:
    with pytest.raises(WasiToolError, match="eps"):
        rank_by_energy(torch.ones(4), eps)  # type: ignore[arg-type]


def test_rank_by_ratio() -> None:
    assert rank_by_ratio(3072, 768, 0.25) == 192
    assert rank_by_ratio(3072, 768, 1.0) == 768
    assert rank_by_ratio(10, 3, 0.01) == 1
    with pytest.raises(WasiToolError):
        rank_by_ratio(10, 3, 0.0)


def test_breakeven_matches_method_doc() -> None:
    assert breakeven_rank(768, 3072) == pytest.approx(614.4)
    assert saves_flops(768, 3072, 614)
    assert not saves_flops(768, 3072, 615)
