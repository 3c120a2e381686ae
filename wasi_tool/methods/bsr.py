"""BSR: block-selective reprogramming with attention-based token dropping (method.md section 7).

Only a few blocks, the final norm and the classifier train; every other parameter is frozen.
Nothing before the first trained block requires grad, so autograd records nothing there (the
blocks run as if under ``no_grad``; tested by counting saved tensors). In the chosen
drop blocks, after attention and its residual, patch tokens are ranked by the CLS token's
attention averaged over heads; the top ``ceil(keep_rate * (N - 1))`` stay with CLS, and the
dropped ones are fused into one token, their average weighted by that attention (EViT), or
discarded (``fuse=False``). Dropping is part of the model: it applies in training, at
inference and in the exported ONNX graph (TopK + GatherElements).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.methods.base import (
    LayerOptions,
    Method,
    ModelPlan,
    Note,
    dense,
    register_method,
)
from wasi_tool.methods.options import MethodOptions, options_of
from wasi_tool.methods.wasi import build_wasi_layer
from wasi_tool.models.families import (
    enable_token_drop_,
    families,
    family_of,
    token_drop_refusal,
)
from wasi_tool.nn.token_drop import check_keep_rate

PAPER_DEPTH = 12
PAPER_BLOCKS = (3, 7, 11)
PAPER_DROP_AT = (3, 6, 9)


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the model's transformer blocks in execution order (its family knows them)."""
    blocks = family_of(model).blocks(model)
    if not blocks:
        known = "; ".join(f.block_layout for f in families() if f.block_layout)
        raise WasiToolError(
            f"bsr needs a model with transformer blocks ({known}); "
            f"{type(model).__name__} has none of them"
        )
    return blocks


def default_indices(depth: int, paper: Sequence[int]) -> list[int]:
    """The paper's 12-block choice scaled to ``depth`` blocks (3,7,11 -> 1,3,5 for 6)."""
    return sorted({min(depth - 1, b * depth // PAPER_DEPTH) for b in paper})


def _check_indices(what: str, indices: Sequence[int], depth: int) -> list[int]:
    bad = [i for i in indices if not 0 <= int(i) < depth]
    if bad:
        raise WasiToolError(f"{what} {bad} out of range: the model has blocks 0..{depth - 1}")
    return sorted({int(i) for i in indices})


@dataclass
class BsrOptions(MethodOptions):
    """bsr's and bsr+wasi's options; targets outside the trained blocks stay frozen.

    Args:
        blocks: the blocks that train, e.g. 3,7,11 (default: 3, 7, 11 scaled to the depth).
        drop_at: the blocks that drop tokens, e.g. 3,6,9 (default: 3, 6, 9 scaled; none: an
            empty list, '' on the command line).
        keep_rate: the share of patch tokens a dropping block keeps.
        fuse: fuse the dropped tokens into one (EViT), or discard them.
    """

    prefix: ClassVar[str] = "bsr_"

    blocks: list[int] | None = None
    drop_at: list[int] | None = field(default=None, metadata={"flat": "drop_at"})
    keep_rate: float = field(default=0.5, metadata={"flat": "keep_rate"})
    fuse: bool = field(default=True, metadata={"flat": "fuse"})

    def check(self) -> None:
        if self.blocks is not None:
            self.blocks = [int(v) for v in self.blocks]
        if self.drop_at is not None:
            self.drop_at = [int(v) for v in self.drop_at]
        self.keep_rate = check_keep_rate(self.keep_rate)


@dataclass
class BSRPlan:
    """Which blocks train and which drop tokens, resolved for one model."""

    blocks: list[str]
    trained: list[int]
    drop_at: list[int]
    keep_rate: float
    fuse: bool
    notes: list[str] = field(default_factory=list)

    @property
    def trained_names(self) -> list[str]:
        return [self.blocks[i] for i in self.trained]

    def to_dict(self) -> dict[str, object]:
        return {
            "trained_blocks": self.trained,
            "drop_at": self.drop_at,
            "keep_rate": self.keep_rate,
            "fuse": self.fuse,
            "block_names": self.trained_names,
            "notes": self.notes,
        }


def bsr_plan(plan: ModelPlan | None) -> BSRPlan:
    """The plan a BSR method's hooks get back from its ``before_targets``."""
    if not isinstance(plan, BSRPlan):
        raise WasiToolError("bsr: the model has no BSR plan (before_targets did not run)")
    return plan


def plan_bsr(
    model: nn.Module,
    trained: Sequence[int] | None = None,
    drop_at: Sequence[int] | None = None,
    keep_rate: float = 0.5,
    fuse: bool = True,
) -> BSRPlan:
    """Resolve the trained and dropping blocks (defaults scaled from the paper's 12 blocks)."""
    check_keep_rate(keep_rate)
    blocks = find_blocks(model)
    depth = len(blocks)
    chosen = (
        _check_indices("bsr blocks", trained, depth)
        if trained is not None
        else default_indices(depth, PAPER_BLOCKS)
    )
    if not chosen:
        raise WasiToolError("bsr needs at least one trained block")
    drops = (
        _check_indices("drop-at blocks", drop_at, depth)
        if drop_at is not None
        else default_indices(depth, PAPER_DROP_AT)
    )
    notes = []
    why = token_drop_refusal(model, model.get_submodule(blocks[0]))
    if drops and why is not None and drop_at is not None and keep_rate < 1.0:
        raise WasiToolError(f"cannot drop tokens (--drop-at) in this model: {why}")
    if drops and why is not None:
        notes.append(f"block selection only, no token dropping: {why}")
        drops = []
    if keep_rate == 1.0:
        drops = []
    return BSRPlan(blocks, chosen, drops, float(keep_rate), bool(fuse), notes)


def trainable_names(model: nn.Module, plan: BSRPlan) -> list[str]:
    """Modules whose parameters train: the chosen blocks, the final norm(s), the classifier."""
    family = family_of(model)
    return [*plan.trained_names, *family.norms(model), *sorted(family.heads(model))]


def freeze_outside_(model: nn.Module, keep: Sequence[str]) -> int:
    """Turn off requires_grad for every parameter outside the ``keep`` modules.

    Parameters inside them are left as they are (a WASI layer's factors never take autograd
    gradients). Returns the number of parameters left trainable.
    """
    inside = {id(p) for name in keep for p in model.get_submodule(name).parameters()}
    for p in model.parameters():
        if id(p) not in inside:
            p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def apply_bsr_(model: nn.Module, plan: BSRPlan) -> list[str]:
    """Freeze all but the trained modules and install token dropping; returns those modules."""
    keep = trainable_names(model, plan)
    freeze_outside_(model, keep)
    enable_token_drop_(model, {plan.blocks[i]: (plan.keep_rate, plan.fuse) for i in plan.drop_at})
    return keep


@torch.no_grad()
def tokens_per_block(model: nn.Module, x: torch.Tensor) -> list[int]:
    """How many tokens each block receives for input ``x`` (one forward pass); a (B, H, W, C)
    input of a Swin block counts H * W."""
    counts: list[int] = []

    def count(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        first = next(
            (a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.ndim >= 3),
            None,
        )
        if first is not None:
            counts.append(math.prod(first.shape[1:-1]))

    handles = [
        model.get_submodule(name).register_forward_pre_hook(count, with_kwargs=True)
        for name in find_blocks(model)
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return counts


def inside_blocks(targets: list[str], blocks: list[str]) -> list[str]:
    """The targets inside ``blocks``; an error when there are none."""
    inside = [t for t in targets if any(t.startswith(f"{b}.") for b in blocks)]
    if not inside:
        raise WasiToolError(
            f"none of the {len(targets)} target layer(s) is inside the trained blocks "
            f"({', '.join(blocks)}): choose --targets or --bsr-blocks that overlap"
        )
    return inside


class BSR(Method):
    """Block selection + token dropping, dense targets in the trained blocks."""

    name = "bsr"
    description = "chosen blocks + final norm + head train (dense), token dropping"
    options = BsrOptions

    def build_layer(self, layer: nn.Module, options: LayerOptions) -> nn.Module:
        return dense(layer)

    def before_targets(self, model: nn.Module, settings: Any, note: Note) -> BSRPlan:
        """Token dropping goes in first: calibration and ASI bases then see the reduced
        token counts."""
        own = options_of(settings, BsrOptions)
        plan = plan_bsr(model, own.blocks, own.drop_at, own.keep_rate, own.fuse)
        for message in plan.notes:
            note(message)
        enable_token_drop_(
            model, {plan.blocks[i]: (plan.keep_rate, plan.fuse) for i in plan.drop_at}
        )
        return plan

    def restrict_targets(self, targets: list[str], plan: ModelPlan | None) -> list[str]:
        return inside_blocks(targets, bsr_plan(plan).trained_names)

    def after_swap(
        self,
        model: nn.Module,
        targets: list[str],
        settings: Any,
        plan: ModelPlan | None,
        note: Note,
    ) -> None:
        plan = bsr_plan(plan)
        trained = trainable_names(model, plan)
        freeze_outside_(model, trained)
        note(
            f"bsr: training {', '.join(trained)}; tokens dropped in blocks {plan.drop_at or 'none'}"
        )

    def plan_record(self, plan: ModelPlan | None) -> dict[str, object] | None:
        return bsr_plan(plan).to_dict()

    def model_accounting(
        self, model: nn.Module, plan: ModelPlan | None, example: Callable[[], Any]
    ) -> dict[str, object]:
        """Tokens per block on one input, and the blocks that save activations.

        Convention, as the BSR paper counts training memory: blocks before the first trained
        block save none, and each later block saves activations for its own token count after
        dropping.
        """
        plan = bsr_plan(plan)
        was_training = model.training
        model.eval()
        tokens = tokens_per_block(model, example()[:1])
        model.train(was_training)
        return {
            "tokens_per_block": tokens,
            "blocks_saving_activations": list(range(plan.trained[0], len(plan.blocks))),
            "convention": "BSR paper: weights + gradients of trainable parameters + saved "
            "activations, none before the first trained block, token counts after dropping",
        }


class BSRWASI(BSR):
    """BSR with WASI target layers inside the trained blocks."""

    name = "bsr+wasi"
    description = "bsr with WASI target layers inside the trained blocks"
    factored_weight = True
    compressed_activations = True

    def build_layer(self, layer: nn.Module, options: LayerOptions) -> nn.Module:
        return build_wasi_layer(layer, options)


register_method(BSR)
register_method(BSRWASI)
