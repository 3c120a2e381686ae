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


def test_server_lr_is_a_step_along_the_mean_update_then_truncated():
    """aggregate(server_lr=lr) = best rank-K approximation of G + lr (mean - G), dense route;
    lr = 1 is plain FedAvg; other tensors take the same step exactly."""
    import numpy as np

    from wasi_tool.federated.payload import aggregate

    o, i, k, n = 24, 16, 4, 3
    lefts, rights, weights = _clients(n + 1, o, i, k, seed=5)
    reference = {"l.L": lefts[0], "l.R": rights[0], "b": torch.zeros(5)}
    gen = torch.Generator().manual_seed(1)
    updates = [
        {"l.L": lf.numpy(), "l.R": r.numpy(), "b": torch.randn(5, generator=gen).numpy()}
        for lf, r in zip(lefts[1:], rights[1:], strict=True)
    ]  # fmt: skip
    w = [
        weights[1] / sum(weights[1:]),
        weights[2] / sum(weights[1:]),
        weights[3] / sum(weights[1:]),
    ]
    g = reference["l.L"].double() @ reference["l.R"].double()
    mean = sum(wi * torch.from_numpy(u["l.L"]).double() @ torch.from_numpy(u["l.R"]).double()
               for wi, u in zip(w, updates, strict=True))  # fmt: skip
    bias_mean = sum(
        wi * torch.from_numpy(u["b"]).double() for wi, u in zip(w, updates, strict=True)
    )
    for lr in (1.0, 2.5, 0.5):
        out = aggregate(updates, weights[1:], reference, server_lr=lr)
        u, s, vh = torch.linalg.svd(g + lr * (mean - g), full_matrices=False)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        got = out["l.L"].double() @ out["l.R"].double()
        torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["b"].double(), lr * bias_mean, rtol=1e-6, atol=1e-6)
        assert np.allclose(out["l.L"].T @ out["l.L"], np.eye(k), atol=1e-5)
    with pytest.raises(WasiToolError, match="server_lr must be in"):
        aggregate(updates, weights[1:], reference, server_lr=0.0)
