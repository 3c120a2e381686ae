"""Training-time linears: WASILinear (factored weight, WSI update; optional ASI activations)
and ASILinear (dense weight, ASI activations)."""

from __future__ import annotations

import contextlib
import copy
from collections import deque
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wasi_tool.autograd import (
    ASIFunction,
    ASIResidualFunction,
    GradSink,
    WASIFunction,
    WASIResidualFunction,
    WSIFunction,
)
from wasi_tool.measure import count_kept
from wasi_tool.nn.factored import FactoredLinear
from wasi_tool.nn.recompute import recording, replaying
from wasi_tool.nn.swap import replace_all_
from wasi_tool.ops.residual import check_sampling, sample_residual_rows
from wasi_tool.ops.tucker import ASI_ORDERS, random_basis, subspace_step, tucker_compress
from wasi_tool.ops.wsi import UPDATE_FORMS, UpdateForm, wsi_update

INIT_ITERS = 2  # extra subspace iterations from the Gaussian start, on the first batch only

Residual = tuple[torch.Tensor, torch.Tensor]  # sampled residual rows (m x I), their indices (m)
Encoded = tuple[torch.Tensor, list[torch.Tensor], Residual | None]


def residual_seed(seed: int) -> int:
    """The residual sampler's seed, derived from the layer's seed (apart from the bases')."""
    return (seed * 2654435761 + 0x5EED) % (2**63)


class ActivationBases:
    """Per-mode bases U_m (D_m x r_m) of one layer's input, warm-started across steps.

    Ranks are fixed per layer; a mode smaller than its rank (a short last batch) uses
    r_m = D_m. A mode whose size changes (batch 64, then a last batch of 10) starts again from
    a seeded Gaussian basis, refined by INIT_ITERS iterations: for the batch mode that loses
    nothing, since one batch's basis says nothing about the next batch's samples.

    ``residual_rows`` m > 0 also samples m rows of the residual x - x~ per step (method.md
    section 9, ``wasi_tool.ops.residual``) from a generator seeded by ``residual_seed(seed)``,
    so that the weight gradient is unbiased; 0 (the default) is plain ASI.
    """

    def __init__(
        self,
        ranks: Sequence[int],
        seed: int = 0,
        order: str = "sequential",
        residual_rows: int = 0,
        residual_sampling: str = "norm",
    ) -> None:
        if not ranks or any(int(r) < 1 for r in ranks):
            raise ValueError(f"activation ranks must be positive, got {tuple(ranks)}")
        if order not in ASI_ORDERS:
            raise ValueError(f"unknown ASI order {order!r}; choose from {ASI_ORDERS}")
        if int(residual_rows) < 0:
            raise ValueError(f"residual rows must be >= 0, got {residual_rows}")
        check_sampling(residual_sampling)
        self.ranks = tuple(int(r) for r in ranks)
        self.seed = seed
        self.order = order
        self.bases: list[torch.Tensor] | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self.residual_rows = int(residual_rows)
        self.residual_sampling = residual_sampling
        self._residual_generator = (
            torch.Generator().manual_seed(residual_seed(seed)) if self.residual_rows else None
        )
        # compressions recorded in a recompute region's first forward, replayed in backward
        self._records: deque[Encoded] = deque()

    @torch.no_grad()
    def compress(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One ASI step on ``x``: (core, bases); the bases are kept as the next warm start."""
        core, bases, _ = self.encode(x)
        return core, bases

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Encoded:
        """One ASI step on ``x`` and, with ``residual_rows``, its residual sample:
        (core, bases, (rows, index) or None)."""
        if x.ndim != len(self.ranks):
            raise ValueError(
                f"activation has {x.ndim} modes {tuple(x.shape)} but {len(self.ranks)} ranks "
                f"{self.ranks} were given"
            )
        if replaying():  # a recompute region runs again: the same step, the same subspace
            if not self._records:
                raise RuntimeError("recompute replayed a WASI/ASI layer it did not record")
            return self._records.popleft()
        x = x.detach().contiguous()
        starts = []
        for mode, dim in enumerate(x.shape):
            rank = min(self.ranks[mode], dim)
            old = self.bases[mode] if self.bases is not None else None
            if old is not None and old.shape == (dim, rank) and old.dtype == x.dtype:
                starts.append(old)
                continue
            u = random_basis(dim, rank, self._generator, x.dtype).to(x.device)
            for _ in range(INIT_ITERS):
                u = subspace_step(x, u, mode)
            starts.append(u)
        core, bases = tucker_compress(x, starts, self.order)
        self.bases = bases
        residual: Residual | None = None
        if self._residual_generator is not None:
            residual = sample_residual_rows(
                x,
                core,
                bases,
                self.residual_rows,
                self._residual_generator,
                self.residual_sampling,
            )
        if recording():
            self._records.append((core, bases, residual))
            for t in (core, *bases, *(residual or ())):
                count_kept(t)  # held until backward, outside autograd's saved tensors
        return core, bases, residual

    def state_dict(self) -> dict[str, object]:
        state: dict[str, object] = {
            "ranks": list(self.ranks),
            "bases": self.bases,
            "generator": self._generator.get_state(),
        }
        if self._residual_generator is not None:
            state["residual_generator"] = self._residual_generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.bases = state["bases"]  # type: ignore[assignment]
        self._generator.set_state(state["generator"])  # type: ignore[arg-type]
        if self._residual_generator is not None and "residual_generator" in state:
            self._residual_generator.set_state(state["residual_generator"])  # type: ignore[arg-type]

    def set_ranks(self, ranks: Sequence[int]) -> None:
        """New per-mode ranks; bases of the old ranks are dropped (the next step starts from
        a seeded basis, as a new layer's first step does). The same ranks keep everything."""
        new = tuple(int(r) for r in ranks)
        if len(new) != len(self.ranks) or min(new) < 1:
            raise ValueError(f"activation ranks must be {len(self.ranks)} positive, got {new}")
        if new != self.ranks:
            self.ranks = new
            self.bases = None

    def snapshot(self) -> dict[str, object]:
        """Everything a step changes (ranks, bases, generators), copied, for ``restore``."""
        return copy.deepcopy(self.state_dict())

    def restore(self, state: dict[str, object]) -> None:
        """Back to a ``snapshot``: its ranks, bases and generators; no pending recompute
        record is kept (a probe that stopped between forward and backward leaves none)."""
        self.ranks = tuple(int(r) for r in state["ranks"])  # type: ignore[attr-defined]
        self.load_state_dict(state)
        self._records.clear()


class SubspaceLayer(nn.Module):
    """A training-time linear whose ASI bases (if any) are part of its ``state_dict``.

    The bases, their ranks and the seeded generator travel as the module's extra state
    (``get_extra_state``/``set_extra_state``), so a checkpoint of the model resumes them
    exactly; ``to_plain`` gives the inference module to save and export.
    """

    act: ActivationBases | None

    def to_plain(self) -> nn.Module:
        raise NotImplementedError

    def get_extra_state(self) -> dict[str, object]:
        return {} if self.act is None else self.act.state_dict()

    def set_extra_state(self, state: dict[str, object]) -> None:
        if self.act is not None and state:
            self.act.load_state_dict(state)

    def set_act_ranks(self, ranks: Sequence[int]) -> None:
        """Compress this layer's input at new per-mode ranks (``ActivationBases.set_ranks``)."""
        if self.act is None:
            raise ValueError("this layer keeps its input exact: it has no activation ranks")
        self.act.set_ranks(ranks)

    def discard_pending(self) -> None:
        """Drop a weight gradient that backward left for a later update (none here)."""


@contextlib.contextmanager
def probing(model: nn.Module) -> Iterator[None]:
    """Steps run inside leave ``model``'s subspace layers as they were: on exit each layer's
    activation ranks, bases and generators are restored and a pending WSI gradient is
    dropped. For probe steps (memory planning, rank matching); the model's parameters,
    ``.grad`` and the global random stream are the caller's to restore."""
    layers = [m for m in model.modules() if isinstance(m, SubspaceLayer)]
    states = [m.act.snapshot() if m.act is not None else None for m in layers]
    try:
        yield
    finally:
        for layer, state in zip(layers, states, strict=True):
            layer.discard_pending()
            if state is not None and layer.act is not None:
                layer.act.restore(state)


class WASILinear(SubspaceLayer):
    """A rank-K linear trained by WSI, holding only L (O x K), R (K x I) and the bias.

    In training mode (with grad enabled) the input is Tucker-compressed by ASI when
    ``act_ranks`` is given (method ``wasi``), or saved whole when it is None (method ``wsi``).
    Backward hands the weight-gradient factors to ``self.sink``; ``subspace_step`` then applies
    the factor-only update. L and R never receive a ``.grad``. Eval forward: (x R^T) L^T + b.
    ``act_residual_rows`` m > 0 (with ``act_ranks``) adds m sampled residual rows to the saved
    activation so the weight gradient is unbiased (``ActivationBases``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        act_ranks: Sequence[int] | None = None,
        bias: bool = True,
        form: UpdateForm = "projection",
        seed: int = 0,
        act_order: str = "sequential",
        act_residual_rows: int = 0,
        act_residual_sampling: str = "norm",
    ) -> None:
        super().__init__()
        if form not in UPDATE_FORMS:
            raise ValueError(f"unknown WSI update form {form!r}; choose from {UPDATE_FORMS}")
        if act_residual_rows and act_ranks is None:
            raise ValueError("act_residual_rows needs act_ranks (full activations are exact)")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.L = nn.Parameter(torch.empty(out_features, rank))
        self.R = nn.Parameter(torch.empty(rank, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.form: UpdateForm = form
        self.act = (
            ActivationBases(act_ranks, seed, act_order, act_residual_rows, act_residual_sampling)
            if act_ranks is not None
            else None
        )
        self.sink = GradSink()

    @classmethod
    def from_factored(
        cls,
        layer: FactoredLinear,
        act_ranks: Sequence[int] | None = None,
        form: UpdateForm = "projection",
        seed: int = 0,
        act_order: str = "sequential",
        act_residual_rows: int = 0,
        act_residual_sampling: str = "norm",
    ) -> WASILinear:
        new = cls(
            layer.in_features,
            layer.out_features,
            layer.rank,
            act_ranks,
            bias=layer.bias is not None,
            form=form,
            seed=seed,
            act_order=act_order,
            act_residual_rows=act_residual_rows,
            act_residual_sampling=act_residual_sampling,
        ).to(device=layer.L.device, dtype=layer.L.dtype)
        # the layer's own tensors, not copies: it is being replaced, and a copy would leave its
        # factors resident beside them (a checkpoint's factors are pages of the file's memory
        # map, which stay resident while any weight of the file is alive: 0.1 GB of ViT-B/32's
        # floor under a budget, issue 34)
        for name in ("L", "R", "bias"):
            mine, theirs = getattr(new, name), getattr(layer, name)
            if mine is None or theirs is None:
                continue
            setattr(new, name, nn.Parameter(theirs.detach(), requires_grad=mine.requires_grad))
        return new

    def to_factored(self) -> FactoredLinear:
        """The plain FactoredLinear with these factors (for artifacts and export)."""
        return FactoredLinear.from_factors(self.L.detach(), self.R.detach(), self.bias)

    def to_plain(self) -> nn.Module:
        return self.to_factored()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return F.linear(F.linear(x, self.R), self.L, self.bias)
        if self.act is None:
            return WSIFunction.apply(x, self.L, self.R, self.bias, self.sink)
        core, bases, residual = self.act.encode(x)
        if residual is None:
            return WASIFunction.apply(x, self.L, self.R, self.bias, self.sink, core, *bases)
        return WASIResidualFunction.apply(
            x, self.L, self.R, self.bias, self.sink, *residual, core, *bases
        )

    @property
    def pending_grad(self) -> torch.Tensor | None:
        """The factor P of the weight gradient that backward left for the WSI update."""
        return self.sink.p

    def grad_sq_norm(self) -> torch.Tensor:
        """||G||_F^2 of the pending gradient: ||P||_F^2 when U has orthonormal columns, else
        from the factors' Gram matrices (``GradSink.sq_norm``)."""
        sq = self.sink.sq_norm()
        return torch.zeros((), dtype=self.L.dtype) if sq is None else sq

    @torch.no_grad()
    def subspace_step(self, lr: float, weight_decay: float = 0.0, clip_coef: float = 1.0) -> None:
        """Apply the pending gradient with one WSI power iteration; clears the sink."""
        if self.sink.p is None:
            return
        left, right = wsi_update(
            self.L, self.R, self.sink.p, self.sink.u, lr, weight_decay, clip_coef, self.form
        )
        self.L.copy_(left)
        self.R.copy_(right)
        self.sink.clear()

    def discard_pending(self) -> None:
        self.sink.clear()

    def extra_repr(self) -> str:
        acts = self.act.ranks if self.act is not None else "full"
        rows = self.act.residual_rows if self.act is not None else 0
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, act_ranks={acts}, form={self.form}"
            + (f", act_residual_rows={rows}" if rows else "")
        )


class ASILinear(SubspaceLayer):
    """A dense linear whose saved activation is Tucker-compressed (method ``asi``).

    The weight gradient P U^T is returned to autograd as a dense ``weight.grad`` so a stock
    optimiser applies it. ``act_residual_rows`` m > 0 adds m sampled residual rows (an unbiased
    weight gradient, ``ActivationBases``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        act_ranks: Sequence[int],
        bias: bool = True,
        seed: int = 0,
        act_order: str = "sequential",
        act_residual_rows: int = 0,
        act_residual_sampling: str = "norm",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.act = ActivationBases(
            act_ranks, seed, act_order, act_residual_rows, act_residual_sampling
        )

    @classmethod
    def from_linear(
        cls,
        layer: nn.Linear,
        act_ranks: Sequence[int],
        seed: int = 0,
        act_order: str = "sequential",
        act_residual_rows: int = 0,
        act_residual_sampling: str = "norm",
    ) -> ASILinear:
        new = cls(
            layer.in_features,
            layer.out_features,
            act_ranks,
            layer.bias is not None,
            seed,
            act_order,
            act_residual_rows,
            act_residual_sampling,
        ).to(device=layer.weight.device, dtype=layer.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(layer.weight)
            if new.bias is not None and layer.bias is not None:
                new.bias.copy_(layer.bias)
        return new

    def to_linear(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            if layer.bias is not None and self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def to_plain(self) -> nn.Module:
        return self.to_linear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return F.linear(x, self.weight, self.bias)
        assert self.act is not None  # an ASILinear always compresses
        core, bases, residual = self.act.encode(x)
        if residual is None:
            return ASIFunction.apply(x, self.weight, self.bias, core, *bases)
        return ASIResidualFunction.apply(x, self.weight, self.bias, *residual, core, *bases)

    def extra_repr(self) -> str:
        rows = self.act.residual_rows if self.act is not None else 0
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"act_ranks={self.act.ranks if self.act is not None else None}"
            + (f", act_residual_rows={rows}" if rows else "")
        )


def to_plain_(model: nn.Module) -> int:
    """Swap every SubspaceLayer of ``model`` for its plain module; returns how many."""
    return replace_all_(model, SubspaceLayer, lambda m: m.to_plain())
