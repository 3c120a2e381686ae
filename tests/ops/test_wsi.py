import pytest
import torch

from wasi_tool.ops.svd import spectrum, truncate
from wasi_tool.ops.tucker import orth
from wasi_tool.ops.wsi import wsi_update


def _factors(o: int, i: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(o, i, dtype=torch.float64, generator=gen)
    return truncate(spectrum(w), k, torch.float64)


@pytest.mark.parametrize(("o", "i"), [(12, 8), (8, 12)])
@pytest.mark.parametrize("with_u", [True, False])
def test_full_rank_update_equals_dense_sgd(o: int, i: int, with_u: bool) -> None:
    k = min(o, i)
    left, right = _factors(o, i, k)
    gen = torch.Generator().manual_seed(1)
    r = 5
    p = torch.randn(o, r if with_u else i, dtype=torch.float64, generator=gen)
    u = orth(torch.randn(i, r, dtype=torch.float64, generator=gen)) if with_u else None
    g = p @ u.T if u is not None else p
    lr, wd, c = 0.05, 1e-2, 0.7
    dense = (1 - lr * wd) * (left @ right) - lr * c * g
    new_l, new_r = wsi_update(left, right, p, u, lr, wd, c, "projection")
    torch.testing.assert_close(new_l @ new_r, dense)
    torch.testing.assert_close(new_l.T @ new_l, torch.eye(k, dtype=torch.float64))
    # The paper's stale-basis form is L' L^T W': not the SGD step even at full rank, because
    # the new basis L' is a rotation of L (both span everything) and L' L^T is not identity.
    paper_l, paper_r = wsi_update(left, right, p, u, lr, wd, c, "paper")
    torch.testing.assert_close(paper_l, new_l)
    torch.testing.assert_close(paper_l @ paper_r, new_l @ left.T @ dense)
    assert not torch.allclose(paper_l @ paper_r, dense)


def test_low_rank_projection_is_the_projected_dense_step() -> None:
    left, right = _factors(20, 16, 4)
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(20, 3, dtype=torch.float64, generator=gen)
    u = orth(torch.randn(16, 3, dtype=torch.float64, generator=gen))
    lr, wd = 0.1, 1e-3
    dense = (1 - lr * wd) * (left @ right) - lr * (p @ u.T)
    new_l, new_r = wsi_update(left, right, p, u, lr, wd, 1.0, "projection")
    # Projection form: L' L'^T W', with L' = orth(W' W'^T L) (one power iteration).
    expected_l = orth(dense @ (dense.T @ left))
    torch.testing.assert_close(new_l, expected_l)
    torch.testing.assert_close(new_l @ new_r, expected_l @ expected_l.T @ dense)
    paper_l, paper_r = wsi_update(left, right, p, u, lr, wd, 1.0, "paper")
    torch.testing.assert_close(paper_l @ paper_r, expected_l @ left.T @ dense)


def test_paper_and_projection_agree_once_converged() -> None:
    left, right = _factors(10, 10, 3)
    zero_p = torch.zeros(10, 2, dtype=torch.float64)
    u = orth(torch.randn(10, 2, dtype=torch.float64))
    a = wsi_update(left, right, zero_p, u, 0.1, 0.0, 1.0, "projection")
    b = wsi_update(left, right, zero_p, u, 0.1, 0.0, 1.0, "paper")
    torch.testing.assert_close(a[0] @ a[1], b[0] @ b[1])
    with pytest.raises(ValueError):
        wsi_update(left, right, zero_p, u, 0.1, form="other")  # type: ignore[arg-type]
