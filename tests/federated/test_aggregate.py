"""Factor aggregation against the dense route: the truncated SVD of the dense weighted mean."""

from __future__ import annotations

import pytest
import torch

from wasi_tool.errors import WasiToolError
from wasi_tool.federated.aggregate import aggregate_factors, fedavg, product_svd


def _clients(n: int, o: int, i: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lefts = [torch.linalg.qr(torch.randn(o, k, generator=gen))[0] for _ in range(n)]
    rights = [torch.randn(k, i, generator=gen) for _ in range(n)]
    weights = [float(w) for w in torch.randint(5, 50, (n,), generator=gen)]
    return lefts, rights, weights


@pytest.mark.parametrize(("n", "o", "i", "k"), [(4, 48, 64, 6), (3, 20, 12, 5), (1, 16, 16, 4)])
def test_factor_aggregation_is_the_truncated_svd_of_the_dense_mean(n, o, i, k):
    lefts, rights, weights = _clients(n, o, i, k)
    total = sum(weights)
    dense = sum(
        w / total * (lf.double() @ r.double())
        for w, lf, r in zip(weights, lefts, rights, strict=True)
    )
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    best = (u[:, :k] * s[:k]) @ vh[:k]

    left, right, sing = aggregate_factors(lefts, rights, weights, k)
    assert left.shape == (o, k) and right.shape == (k, i) and left.dtype == torch.float32
    torch.testing.assert_close(left.double() @ right.double(), best, rtol=1e-5, atol=1e-5)
    r = min(o, i, n * k)
    torch.testing.assert_close(sing, s[:r], rtol=1e-10, atol=1e-10)
    # the gauge FactoredLinear and WASI keep: orthonormal columns in L
    torch.testing.assert_close(left.T @ left, torch.eye(k), rtol=1e-5, atol=1e-5)
    # the untruncated SVD from the core reproduces the dense mean itself
    uu, ss, vv = product_svd(lefts, rights, weights)
    torch.testing.assert_close((uu * ss) @ vv, dense, rtol=1e-10, atol=1e-10)


def test_balanced_split_for_lora_and_rank_padding():
    lefts, rights, weights = _clients(2, 10, 8, 2, seed=3)
    left, right, _ = aggregate_factors(lefts, rights, weights, 6, balanced=True)
    assert left.shape == (10, 6) and right.shape == (6, 8)  # rank 4 padded to 6 with zeros
    dense = sum(w / sum(weights) * lf @ r for w, lf, r in zip(weights, lefts, rights, strict=True))
    torch.testing.assert_close(left @ right, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left.norm(dim=0), right.norm(dim=1), rtol=1e-5, atol=1e-6)


def test_fedavg_weighted_mean_and_bad_weights():
    a, b = torch.ones(3), torch.zeros(3)
    torch.testing.assert_close(fedavg([a, b], [3, 1]), torch.full((3,), 0.75))
    with pytest.raises(WasiToolError):
        fedavg([a, b], [0, 0])
