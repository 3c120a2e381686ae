"""WASI / WSI / ASI layers against a dense nn.Linear trained by stock SGD + clip_grad_norm_."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from wasi_tool.methods.optim import SubspaceSGD
from wasi_tool.nn import ASILinear, FactoredLinear, WASILinear

LR, WD, CLIP = 0.05, 1e-2, 0.5
SHAPES = {"3d": (4, 5, 12), "4d": (2, 3, 4, 12)}


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, WASILinear):
        return (layer.L @ layer.R).detach()
    return layer.weight.detach()  # type: ignore[return-value]


def _make(method: str, ref: nn.Linear, x_shape: tuple[int, ...]) -> nn.Module:
    full_ranks = list(x_shape)
    if method == "asi":
        return ASILinear.from_linear(ref, full_ranks)
    fact = FactoredLinear.from_linear(ref, rank=min(ref.in_features, ref.out_features))
    return WASILinear.from_factored(fact, act_ranks=full_ranks if method == "wasi" else None)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("method", ["wasi", "wsi", "asi"])
def test_full_rank_training_equals_vanilla(method: str, shape: str) -> None:
    """Same dA, same updates, over several clipped steps (the clip is active at CLIP=0.5)."""
    torch.manual_seed(0)
    x_shape = SHAPES[shape]
    ref = nn.Linear(12, 10).double()
    layer = _make(method, copy.deepcopy(ref), x_shape).double().train()
    opt_ref = torch.optim.SGD(ref.parameters(), lr=LR, weight_decay=WD)
    opt = SubspaceSGD(layer, lr=LR, weight_decay=WD, clip=CLIP)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(*x_shape, dtype=torch.float64, generator=gen)
        target = torch.randn(*x_shape[:-1], 10, dtype=torch.float64, generator=gen)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ((ref(xa) - target) ** 2).sum().backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        opt.zero_grad()
        ((layer(xb) - target) ** 2).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad)  # dA against autograd
        torch.testing.assert_close(opt.grad_norm(), norm.double())
        opt_ref.step()
        opt_ref.zero_grad()
        opt.step()
        torch.testing.assert_close(_dense_weight(layer), ref.weight.detach())
        torch.testing.assert_close(layer.bias.detach(), ref.bias.detach())
    assert opt.last_clip_coef < 1.0


def _saved_bytes(layer: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(bytes of saved non-parameter storages, bytes of saved parameter storages)."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.sum().backward()
    own = sum(n for ptr, n in seen.items() if ptr not in params)
    return own, sum(n for ptr, n in seen.items() if ptr in params)


@pytest.mark.parametrize(
    ("x_shape", "ranks"),
    [((16, 20, 96), (4, 5, 8)), ((4, 6, 6, 96), (2, 3, 3, 8))],
)
def test_saved_bytes_match_the_formula(x_shape: tuple[int, ...], ranks: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    dense = nn.Linear(96, 384)
    layer = WASILinear.from_factored(FactoredLinear.from_linear(dense, 16), act_ranks=ranks).train()
    x = torch.randn(*x_shape, requires_grad=True)  # as inside a network
    core = 1
    for r in ranks:
        core *= r
    formula = 4 * (core + sum(d * r for d, r in zip(x_shape, ranks, strict=True)))
    own, _ = _saved_bytes(layer, x)
    assert abs(own - formula) <= 0.05 * formula, (own, formula)
    vanilla, _ = _saved_bytes(dense, torch.randn(*x_shape, requires_grad=True))
    assert vanilla == 4 * x.numel()  # nn.Linear saves its input
    assert own * 10 < vanilla


class _ShapeLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def _dense_sized(shapes: list[tuple[str, tuple[int, ...]]], o: int, i: int) -> list[str]:
    """Ops whose output is shaped like the dense weight or its transpose."""
    return [f"{f} {s}" for f, s in shapes if s in ((o, i), (i, o))]


def _reachable_tensors(obj: object, seen: set[int] | None = None) -> list[torch.Tensor]:
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        found = [obj]
        if obj.grad is not None:
            found.append(obj.grad)
        return found
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _reachable_tensors(v, seen)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _reachable_tensors(v, seen)]
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return _reachable_tensors(vars(obj), seen)
    return []


def _step(layer: nn.Module, x_shape: tuple[int, ...]) -> _ShapeLog:
    opt = SubspaceSGD(layer, lr=LR, weight_decay=WD, clip=CLIP)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # the second step is the steady state: warm-started bases
        x = torch.randn(*x_shape, generator=gen, requires_grad=True)
        with _ShapeLog() as log:
            opt.zero_grad()
            layer(x).pow(2).sum().backward()
            opt.step()
    return log


def test_no_dense_weight_sized_tensor_exists_for_a_wasi_layer() -> None:
    o, i, x_shape = 384, 96, (16, 20, 96)
    torch.manual_seed(0)
    fact = FactoredLinear.from_linear(nn.Linear(i, o), 16)
    layer = WASILinear.from_factored(fact, act_ranks=(4, 5, 8)).train()
    log = _step(layer, x_shape)
    assert _dense_sized(log.shapes, o, i) == []  # none created in forward, backward or update
    big = [tuple(t.shape) for t in _reachable_tensors(layer) if t.numel() >= o * i]  # any shape
    assert big == []
    assert layer.L.grad is None and layer.R.grad is None

    # The same probe does see the dense gradient that WSI (full activations) forms.
    wsi = WASILinear.from_factored(fact, act_ranks=None).train()
    assert _dense_sized(_step(wsi, x_shape).shapes, o, i) != []


def test_eval_forward_is_the_factored_product() -> None:
    torch.manual_seed(0)
    fact = FactoredLinear.from_linear(nn.Linear(12, 10), 4)
    layer = WASILinear.from_factored(fact, act_ranks=(2, 2, 2)).eval()
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(layer(x), fact(x))
    torch.testing.assert_close(layer.to_factored()(x), fact(x))
    with pytest.raises(ValueError, match="3 ranks"):
        layer.train()(torch.randn(2, 3, 4, 12))


def test_short_last_batch_is_handled() -> None:
    torch.manual_seed(0)
    fact = FactoredLinear.from_linear(nn.Linear(12, 10), 4)
    layer = WASILinear.from_factored(fact, act_ranks=(4, 3, 5)).train()
    opt = SubspaceSGD(layer, lr=LR)
    for batch in (8, 8, 3, 8):  # 3 < r1 = 4: that step uses r1 = 3
        opt.zero_grad()
        layer(torch.randn(batch, 6, 12, requires_grad=True)).sum().backward()
        opt.step()
        assert layer.act is not None and layer.act.bases is not None
        assert layer.act.bases[0].shape == (batch, min(4, batch))


def test_momentum_is_refused_for_subspace_layers() -> None:
    fact = FactoredLinear.from_linear(nn.Linear(12, 10), 4)
    with pytest.raises(Exception, match="momentum"):
        SubspaceSGD(WASILinear.from_factored(fact), lr=0.1, momentum=0.9)


def test_asi_bases_live_in_the_state_dict() -> None:
    """The warm-started bases, their generator and ranks travel with ``state_dict`` (extra
    state), so a model reloaded from it compresses the next batch exactly as the original."""
    torch.manual_seed(0)
    layer = WASILinear.from_factored(FactoredLinear(12, 10, 4), act_ranks=(2, 3, 5), seed=7)
    layer.train()
    x = torch.randn(4, 6, 12)
    layer(x).sum().backward()
    state = layer.state_dict()
    assert "_extra_state" in state and state["_extra_state"]["ranks"] == [2, 3, 5]
    assert [tuple(b.shape) for b in state["_extra_state"]["bases"]] == [(4, 2), (6, 3), (12, 5)]
    twin = WASILinear.from_factored(FactoredLinear(12, 10, 4), act_ranks=(2, 3, 5), seed=99)
    twin.load_state_dict(state)
    assert twin.act is not None and layer.act is not None
    for a, b in zip(twin.act.bases or [], layer.act.bases or [], strict=True):
        assert torch.equal(a, b)
    y = torch.randn(4, 6, 12)
    core_a, bases_a = layer.act.compress(y)
    core_b, bases_b = twin.act.compress(y)
    assert torch.equal(core_a, core_b)
    assert all(torch.equal(a, b) for a, b in zip(bases_a, bases_b, strict=True))
    # the plain modules carry no extra state: what is saved and exported is unchanged
    assert "_extra_state" not in layer.to_plain().state_dict()
    asi = ASILinear.from_linear(nn.Linear(12, 10), (2, 3, 5))
    assert "_extra_state" in asi.state_dict()
    assert set(asi.to_plain().state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("kind", ["wasi", "asi", "wasi-fixed"])
def test_probing_leaves_the_layers_as_they_were(kind: str) -> None:
    """Steps inside ``probing`` (at other ranks, even one stopped before its update) leave
    every subspace layer as before: the next real step equals the one without the probes."""
    from wasi_tool.methods.fixed import FixedWASILinear
    from wasi_tool.nn.subspace import probing

    def build() -> nn.Module:
        torch.manual_seed(0)
        if kind == "asi":
            layer: nn.Module = ASILinear.from_linear(nn.Linear(12, 10), (2, 3, 5), seed=3)
        elif kind == "wasi":
            layer = WASILinear.from_factored(FactoredLinear(12, 10, 4), (2, 3, 5), seed=3)
        else:
            layer = FixedWASILinear.from_factored(FactoredLinear(12, 10, 4), (2, 3, 5), seed=3)
        return nn.Sequential(layer).train()

    x1, x2, probe = torch.randn(4, 6, 12), torch.randn(4, 6, 12), torch.randn(3, 6, 12)
    runs = []
    for with_probe in (False, True):
        model = build()
        opt = SubspaceSGD(model, lr=0.1)
        model(x1).square().sum().backward()
        opt.step()
        opt.zero_grad()
        layer = model[0]
        before = copy.deepcopy(layer.get_extra_state())
        calibrations = getattr(layer.act, "calibrations", None)
        if with_probe:
            with probing(model):
                layer.set_act_ranks((3, 6, 12))  # other ranks: the bases start afresh
                assert layer.act.ranks == (3, 6, 12) and layer.act.bases is None
                model(probe).square().sum().backward()  # a gradient left pending
            assert layer.act.ranks == (2, 3, 5)
            after = layer.get_extra_state()
            assert after["ranks"] == before["ranks"]
            for a, b in zip(after["bases"], before["bases"], strict=True):
                assert (a is None and b is None) or torch.equal(a, b)
            assert torch.equal(after["generator"], before["generator"])
            assert getattr(layer.act, "calibrations", None) == calibrations
            if isinstance(layer, WASILinear):
                assert layer.pending_grad is None
            model.zero_grad()
        model(x2).square().sum().backward()
        opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_set_act_ranks_refuses_an_exact_layer() -> None:
    layer = WASILinear.from_factored(FactoredLinear(12, 10, 4))
    with pytest.raises(ValueError, match="no activation ranks"):
        layer.set_act_ranks((2, 3, 5))
