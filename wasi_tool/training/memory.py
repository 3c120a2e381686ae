"""What a training step keeps outside the targets: recompute regions and lossy storage, set
in one place for ``prepare`` and the memory planner."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.models.families import family_of
from wasi_tool.models.families.custom import torch_transformer_layers
from wasi_tool.nn.lossy import lossy_modules, store_lossy_, undo_lossy_
from wasi_tool.nn.recompute import recompute_, undo_recompute_
from wasi_tool.nn.subspace import probing


def apply_memory_mode_(
    model: nn.Module, mode: str, lossy: str = "off", *, strict: bool = True
) -> tuple[list[str], list[str]]:
    """Make ``model`` recompute its ``mode`` regions ("off", "block", "mlp", "attn": the
    family's blocks or their halves) and keep the norms' and GELUs' saved inputs as ``lossy``
    says, and nothing else (what an earlier call did is undone first). Returns the regions
    and the lossy modules. ``strict``: a mode that finds no region is an error."""
    undo_recompute_(model)
    undo_lossy_(model)
    family = family_of(model)
    regions = family.regions(model, mode) if mode != "off" else []
    if mode == "block" and not regions:  # a plain PyTorch model: its encoder/decoder layers
        # (what the custom family calls its blocks; the fallback family knows none)
        regions = torch_transformer_layers(model)
    if mode != "off" and not regions and strict:
        raise WasiToolError(f"memory_mode {mode}: this model has no {mode} regions to recompute")
    for name in regions:
        recompute_(model.get_submodule(name))
    names: list[str] = []
    if lossy != "off":
        names = lossy_modules(model, family.blocks(model))
        store_lossy_(model, names, lossy)
    return regions, names


@contextlib.contextmanager
def probe_steps(model: nn.Module) -> Iterator[None]:
    """Steps run inside (a planner's or a rank matcher's probes) leave ``model`` as they found
    it: its subspace layers (``nn.subspace.probing``: ranks, bases, generators, no pending
    WSI gradient), no ``.grad``, its train/eval mode, and the global random stream (a probe's
    dropout draws must not shift the run's)."""
    rng = torch.random.get_rng_state()
    was_training = model.training
    try:
        with probing(model):
            yield
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        torch.random.set_rng_state(rng)
