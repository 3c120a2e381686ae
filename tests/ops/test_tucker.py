import pytest
import torch

from wasi_tool.ops.tucker import (
    compress_order,
    lowrank_weight_and_bias_grad,
    lowrank_weight_grad_factors,
    mode_gram_apply,
    mode_product,
    orth,
    random_basis,
    subspace_step,
    tucker_compress,
    tucker_core,
    tucker_expand,
)

SHAPES = [(6, 5, 7), (3, 4, 5, 6)]


def unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


@pytest.mark.parametrize("shape", SHAPES)
def test_mode_product_and_gram_match_unfoldings(shape: tuple[int, ...]) -> None:
    t = torch.randn(*shape, dtype=torch.float64)
    for mode, dim in enumerate(shape):
        u = torch.randn(dim, 3, dtype=torch.float64)
        expected = (u.T @ unfold(t, mode)).reshape(
            3, *[d for i, d in enumerate(shape) if i != mode]
        )
        torch.testing.assert_close(
            mode_product(t, u, mode, transpose=True), expected.movedim(0, mode)
        )
        torch.testing.assert_close(
            mode_gram_apply(t, u, mode), unfold(t, mode) @ unfold(t, mode).T @ u
        )


@pytest.mark.parametrize("order", ["sequential", "parallel"])
@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_tucker_is_exact(shape: tuple[int, ...], order: str) -> None:
    t = torch.randn(*shape, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    bases = [random_basis(d, d, gen, torch.float64) for d in shape]
    core, new = tucker_compress(t, bases, order)
    assert core.shape == t.shape
    torch.testing.assert_close(tucker_expand(core, new), t)


def test_subspace_iteration_converges_to_the_dominant_subspace() -> None:
    gen = torch.Generator().manual_seed(0)
    # A (B, N, C) tensor whose mode-3 unfolding has a clear rank-4 dominant part.
    signal = torch.randn(200, 4, dtype=torch.float64, generator=gen) @ torch.randn(
        4, 32, dtype=torch.float64, generator=gen
    )
    t = (signal + 0.01 * torch.randn(200, 32, dtype=torch.float64, generator=gen)).reshape(
        10, 20, 32
    )
    u = random_basis(32, 4, gen, torch.float64)
    for _ in range(20):
        u = subspace_step(t, u, 2)
    top = torch.linalg.svd(unfold(t, 2), full_matrices=False).U[:, :4]
    # Same subspace: the projectors agree.
    torch.testing.assert_close(u @ u.T, top @ top.T, atol=1e-8, rtol=0)


def test_sequential_sweep_projects_each_mode_on_the_partial_core() -> None:
    gen = torch.Generator().manual_seed(4)
    t = torch.randn(8, 6, 10, dtype=torch.float64, generator=gen)
    ranks = (3, 2, 4)
    starts = [random_basis(d, r, gen, torch.float64) for d, r in zip(t.shape, ranks, strict=True)]
    core, new = tucker_compress(t, starts, "sequential")
    # compress_order visits mode 1 (r/D = 2/6), then 0 (3/8), then 2 (4/10).
    assert compress_order(t.shape, ranks) == [1, 0, 2]
    u1 = subspace_step(t, starts[1], 1)
    y = mode_product(t, u1, 1, transpose=True)
    u0 = subspace_step(y, starts[0], 0)
    y = mode_product(y, u0, 0, transpose=True)
    u2 = subspace_step(y, starts[2], 2)
    torch.testing.assert_close(new[1], u1)
    torch.testing.assert_close(new[0], u0)
    torch.testing.assert_close(new[2], u2)
    torch.testing.assert_close(core, mode_product(y, u2, 2, transpose=True))
    with pytest.raises(ValueError, match="unknown ASI order"):
        tucker_compress(t, starts, "random")


def test_core_order_does_not_change_the_result() -> None:
    t = torch.randn(8, 6, 10, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    bases = [
        random_basis(d, r, gen, torch.float64) for d, r in zip(t.shape, (2, 5, 3), strict=True)
    ]
    naive = t
    for mode, u in enumerate(bases):
        naive = mode_product(naive, u, mode, transpose=True)
    torch.testing.assert_close(tucker_core(t, bases), naive)


@pytest.mark.parametrize("shape", SHAPES)
def test_lowrank_gradient_factors_equal_dense_gradient(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(2)
    t = torch.randn(*shape, dtype=torch.float64, generator=gen)
    ranks = [max(1, d - 2) for d in shape]
    bases = [random_basis(d, r, gen, torch.float64) for d, r in zip(shape, ranks, strict=True)]
    core, bases = tucker_compress(t, bases)
    approx = tucker_expand(core, bases)
    dy = torch.randn(*shape[:-1], 9, dtype=torch.float64, generator=gen)
    p, u = lowrank_weight_grad_factors(dy, core, bases)
    dense = dy.reshape(-1, 9).T @ approx.reshape(-1, shape[-1])
    torch.testing.assert_close(p @ u.T, dense)
    # ||G||_F = ||P||_F because U has orthonormal columns.
    torch.testing.assert_close(torch.linalg.matrix_norm(p), torch.linalg.matrix_norm(dense))


def test_orth_is_orthonormal_and_deterministic() -> None:
    x = torch.randn(12, 4, dtype=torch.float64)
    q = orth(x)
    torch.testing.assert_close(q.T @ q, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(orth(x), q)
    assert (torch.diagonal(q.T @ x) > 0).all()


def test_orth_of_float32_is_the_thin_qr_up_to_cond_1e5() -> None:
    """Q from the float64 Cholesky (R's inverse applied as a GEMM) is the thin QR of the stored
    float32 matrix, computed by Householder in float64, to float32 rounding."""
    gen = torch.Generator().manual_seed(3)
    q0, _ = torch.linalg.qr(torch.randn(300, 40, dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=gen))
    x = ((q0 * torch.logspace(0, -5, 40, dtype=torch.float64)) @ v.T).float()
    q = orth(x)
    assert q.dtype == torch.float32
    ref, r = torch.linalg.qr(x.double())
    ref = ref * torch.sign(torch.diagonal(r))
    torch.testing.assert_close(q.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        q.double().T @ q.double(), torch.eye(40, dtype=torch.float64), atol=1e-6, rtol=0
    )
    # a bfloat16 input (a user's autocast) keeps its dtype: the check is made in float64
    low = orth(x.bfloat16())
    assert low.dtype == torch.bfloat16
    ref_low, r_low = torch.linalg.qr(x.bfloat16().double())
    ref_low = ref_low * torch.sign(torch.diagonal(r_low))
    torch.testing.assert_close(low.double(), ref_low, atol=1e-2, rtol=0)


def test_orth_of_rank_deficient_or_non_finite_input_falls_back() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(50, 6, generator=gen)
    x[:, 3] = x[:, 1]  # rank 5: no Cholesky factor, Householder QR instead
    q = orth(x)
    torch.testing.assert_close(q.T @ q, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(q @ (q.T @ x), x, atol=1e-4, rtol=0)
    x[0, 0] = float("nan")
    assert not bool(torch.isfinite(orth(x)).all())  # never a finite basis of a NaN matrix


@pytest.mark.parametrize("shape", SHAPES)
def test_weight_and_bias_grad_from_one_gemm(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(5)
    t = torch.randn(*shape, dtype=torch.float64, generator=gen)
    bases = [random_basis(d, max(1, d - 1), gen, torch.float64) for d in shape]
    core, bases = tucker_compress(t, bases)
    dy = torch.randn(*shape[:-1], 7, dtype=torch.float64, generator=gen)
    p, u, db = lowrank_weight_and_bias_grad(dy, core, bases)
    p_ref, u_ref = lowrank_weight_grad_factors(dy, core, bases)
    torch.testing.assert_close(p, p_ref)
    assert u is u_ref or torch.equal(u, u_ref)
    torch.testing.assert_close(db, dy.reshape(-1, 7).sum(0))
