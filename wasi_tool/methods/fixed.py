"""asi-fixed / wasi-fixed: a fixed activation subspace (LANCE-style, arXiv 2509.21617).

ASI refreshes each mode's basis by one subspace iteration every step (QRs on every batch).
Here the bases are computed once, by a one-shot HOSVD (the top eigenvectors of each mode's Gram
A_(m) A_(m)^T), on the first batch a layer trains on: the session's calibration batch (the
first batch of epoch 0; the bench's batch; ``wasi_tool.prepare``'s first training batch). Every
later step only projects: the core S = A x_2 U_2^T x_3 U_3^T ... is computed by mode products
onto the fixed bases, and no QR, eigendecomposition or subspace iteration runs. A natural
ablation of WASI's per-step iteration.

The batch mode is kept whole: a basis of the batch axis says nothing about the next batch's
samples (method.md section 4), so the batch rank r_1 of the chosen ranks is not used and that
mode's basis is the identity (one B x B matrix shared by every layer). What a layer stores per
step: B r_2 r_3 (core) + N r_2 + I r_3 (the fixed bases) + B^2 (the shared identity, counted
once). At full ranks the projection is exact, so training equals vanilla (asi-fixed) or wsi
(wasi-fixed).

The bases travel in the layer's state dict (a checkpoint resumes them); a rank change (the
memory plan) or a mode whose size changes recalibrates on the next batch.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from wasi_tool.measure import count_kept
from wasi_tool.methods.base import LayerOptions, Method, dense, factored, register_method
from wasi_tool.nn.recompute import recording, replaying
from wasi_tool.nn.subspace import ActivationBases, ASILinear, WASILinear
from wasi_tool.ops.tucker import compress_order, mode_product

_EYES: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def identity(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One shared identity per (size, dtype, device): the batch mode's basis of every layer."""
    key = (size, dtype, device)
    eye = _EYES.get(key)
    if eye is None:
        eye = _EYES[key] = torch.eye(size, dtype=dtype, device=device)
    return eye


def hosvd_basis(x: torch.Tensor, mode: int, rank: int) -> torch.Tensor:
    """The top ``rank`` left singular vectors of the mode-``mode`` unfolding of ``x``
    (D_m x r), from the eigendecomposition of its Gram in float64; each column's largest
    entry is made positive, so the basis is deterministic."""
    shape = x.shape
    # the unfolding A_(m) (D_m x rest) in float64: one copy of x, and a D_m x D_m Gram (a
    # batched product over the leading modes would hold one D_m x D_m matrix per row)
    t = x.reshape(math.prod(shape[:mode]), shape[mode], -1).transpose(0, 1)
    unfolded = t.reshape(shape[mode], -1).double()
    gram = unfolded @ unfolded.T
    _, vectors = torch.linalg.eigh(gram)
    u = vectors[:, -rank:].flip(-1)
    peak = u.gather(0, u.abs().argmax(0, keepdim=True))
    return (u * torch.sign(peak)).to(x.dtype)


class FixedActivationBases(ActivationBases):
    """ActivationBases whose non-batch bases are computed once (a one-shot HOSVD on the first
    batch) and then only projected onto; the batch mode is kept whole (identity basis).

    ``calibrations`` counts the one-shot HOSVDs (one per layer, unless the ranks or a mode's
    size change)."""

    whole_batch: ClassVar[bool] = True

    def __init__(self, ranks: Any, seed: int = 0, order: str = "sequential") -> None:
        super().__init__(ranks, seed, order)
        self.calibrations = 0

    @classmethod
    def like(cls, other: ActivationBases) -> FixedActivationBases:
        new = cls(other.ranks, other.seed, other.order)
        new.bases = other.bases if isinstance(other, FixedActivationBases) else None
        return new

    def snapshot(self) -> dict[str, object]:
        return {**super().snapshot(), "calibrations": self.calibrations}

    def restore(self, state: dict[str, object]) -> None:
        super().restore(state)
        self.calibrations = int(state.get("calibrations", self.calibrations))  # type: ignore[call-overload]

    def _fits(self, x: torch.Tensor) -> bool:
        if self.bases is None or len(self.bases) != x.ndim:
            return False
        for mode in range(1, x.ndim):
            u = self.bases[mode]
            dim = x.shape[mode]
            if u is None or u.shape != (dim, min(self.ranks[mode], dim)) or u.dtype != x.dtype:
                return False
        return True

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """The one-shot HOSVD of ``x``: each non-batch mode's top singular vectors."""
        x = x.detach()
        bases: list[Any] = [None]
        for mode in range(1, x.ndim):
            bases.append(hosvd_basis(x, mode, min(self.ranks[mode], x.shape[mode])))
        self.bases = bases
        self.calibrations += 1

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Any:
        """Project ``x`` onto the fixed bases: (core, bases, None), no iteration (no residual
        sample: the unbiased estimate is an option of asi/wasi, not of the fixed variant)."""
        if x.ndim != len(self.ranks):
            raise ValueError(
                f"activation has {x.ndim} modes {tuple(x.shape)} but {len(self.ranks)} ranks "
                f"{self.ranks} were given"
            )
        if replaying():  # a recompute region runs again: the same projection
            if not self._records:
                raise RuntimeError("recompute replayed a WASI/ASI layer it did not record")
            return self._records.popleft()
        x = x.detach().contiguous()
        if not self._fits(x):
            self.calibrate(x)
        assert self.bases is not None
        bases = [identity(x.shape[0], x.dtype, x.device), *self.bases[1:]]
        ranks = [u.shape[1] for u in bases]
        core = x
        for mode in compress_order(x.shape, ranks):
            if mode:
                core = mode_product(core, bases[mode], mode, transpose=True)
        if recording():
            self._records.append((core, bases, None))
            for t in (core, *bases):
                count_kept(t)
        return core, bases, None


class _FixedAct:
    """Mixin: whatever ActivationBases a layer is given (at construction, or by prepare's
    calibration on the first batch) becomes a FixedActivationBases."""

    _fixed_act: FixedActivationBases | None

    @property
    def act(self) -> FixedActivationBases | None:
        return self.__dict__.get("_fixed_act")

    @act.setter
    def act(self, value: ActivationBases | None) -> None:
        fixed = None if value is None else FixedActivationBases.like(value)
        self.__dict__["_fixed_act"] = fixed


class FixedASILinear(_FixedAct, ASILinear):  # type: ignore[misc]
    """ASILinear with a fixed activation subspace."""


class FixedWASILinear(_FixedAct, WASILinear):  # type: ignore[misc]
    """WASILinear with a fixed activation subspace."""


class ASIFixed(Method):
    name = "asi-fixed"
    description = "dense weight, activations projected on fixed one-shot HOSVD bases"
    compressed_activations = True

    def build_layer(self, layer: nn.Module, options: LayerOptions) -> nn.Module:
        base = dense(layer)
        new = FixedASILinear(
            base.in_features,
            base.out_features,
            options.act_ranks or (),
            base.bias is not None,
            options.seed,
            options.act_order,
        ).to(device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(base.weight)
            if new.bias is not None and base.bias is not None:
                new.bias.copy_(base.bias)
        return new


class WASIFixed(Method):
    name = "wasi-fixed"
    description = "factored weight (WSI), activations projected on fixed one-shot HOSVD bases"
    factored_weight = True
    compressed_activations = True

    def build_layer(self, layer: nn.Module, options: LayerOptions) -> nn.Module:
        f = factored(layer)
        new = FixedWASILinear(
            f.in_features,
            f.out_features,
            f.rank,
            options.act_ranks,
            bias=f.bias is not None,
            form=options.form,
            seed=options.seed,
            act_order=options.act_order,
        ).to(device=f.L.device, dtype=f.L.dtype)
        with torch.no_grad():
            new.L.copy_(f.L)
            new.R.copy_(f.R)
            if new.bias is not None and f.bias is not None:
                new.bias.copy_(f.bias)
        return new


register_method(ASIFixed)
register_method(WASIFixed)
