import pytest
import torch

from wasi_tool.ops import factored_spectrum, kept_energy, spectrum, truncate


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])  # tall, and wide (via the transpose)
def test_full_rank_truncation_reconstructs_weight(shape: tuple[int, int]) -> None:
    w = torch.randn(*shape)
    spec = spectrum(w)
    k = min(shape)
    assert spec.u.shape == (shape[0], k) and spec.vh.shape == (k, shape[1])
    left, right = truncate(spec, k, torch.float32)
    assert left.is_contiguous() and right.is_contiguous()
    torch.testing.assert_close(left @ right, w)
    torch.testing.assert_close(left.T @ left, torch.eye(k), atol=1e-5, rtol=0)
    torch.testing.assert_close(spec.s, torch.linalg.svdvals(w.double()))
    assert kept_energy(spec, k) == 1.0


def test_truncation_is_best_rank_k() -> None:
    w = torch.randn(40, 30, dtype=torch.float64)
    spec = spectrum(w)
    left, right = truncate(spec, 7, torch.float64)
    err = torch.linalg.matrix_norm(w - left @ right).item() ** 2
    # Eckart-Young: the squared error is the energy of the dropped singular values.
    assert abs(err - (spec.s[7:] ** 2).sum().item()) < 1e-9
    assert abs(kept_energy(spec, 7) - (1 - err / (spec.s**2).sum().item())) < 1e-12


def test_factored_spectrum_equals_dense_spectrum() -> None:
    w = torch.randn(50, 6, dtype=torch.float64) @ torch.randn(6, 20, dtype=torch.float64)
    left, right = truncate(spectrum(w), 6, torch.float64)
    fs = factored_spectrum(left, right)
    torch.testing.assert_close(fs.s, spectrum(w).s[:6])
    torch.testing.assert_close(fs.u @ torch.diag(fs.s) @ fs.vh, w)
