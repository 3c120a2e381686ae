"""Choosing per-layer activation ranks on calibration batches (method.md section 4).

A one-time HOSVD of each target layer's input: per-mode singular values from the smaller Gram
matrix of the mode unfolding (float64), ranks by the energy rule, or per-layer ranks chosen
under a memory budget to minimise the summed weight-gradient error, by dynamic programming.
Also each layer's input Gram matrix X^T X, streamed over batches, for data-aware compression
(method.md section 8, ``calibrate_grams``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.models.families import family_of
from wasi_tool.nn.recompute import recompute_in_eval, replaying
from wasi_tool.ops.accounting import tucker_elements
from wasi_tool.ops.rank import rank_by_energy
from wasi_tool.ops.tucker import tucker_core, tucker_expand

T = TypeVar("T")
# The reference protocol's candidates (0.4-0.9), and above them the energies that a roomy budget
# can afford: at 0.9 a layer's gradient error is still ~0.3-0.5 (benchmarks/fidelity.py), so a
# budget with room left buys rank where it lowers the error most (issue 33).
BUDGET_EPS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
MB = 1024 * 1024  # budgets are in MiB, as the reference code counts them


def _unfold(a: torch.Tensor, mode: int) -> torch.Tensor:
    return a.movedim(mode, 0).reshape(a.shape[mode], -1)


def mode_svd(a: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, s) of the mode-``mode`` unfolding (float64), through its smaller Gram matrix."""
    x = _unfold(a.detach().to(torch.float64), mode)
    if x.shape[0] <= x.shape[1]:
        evals, u = torch.linalg.eigh(x @ x.T)
        evals, u = evals.flip(0), u.flip(1)
        return u, evals.clamp_min(0).sqrt()
    evals, v = torch.linalg.eigh(x.T @ x)
    evals, v = evals.flip(0), v.flip(1)
    s = evals.clamp_min(0).sqrt()
    keep = s > s[0] * 1e-12 if s.numel() and s[0] > 0 else s > 0
    u = (x @ v[:, keep]) / s[keep]
    return u, s


@dataclass
class LayerSpectra:
    """Per-mode bases and singular values of one layer's calibration input."""

    shape: tuple[int, ...]
    bases: list[torch.Tensor]
    values: list[torch.Tensor]

    def ranks(self, eps: float) -> tuple[int, ...]:
        return tuple(
            min(rank_by_energy(s, eps), u.shape[1])
            for u, s in zip(self.bases, self.values, strict=True)
        )


def spectra(a: torch.Tensor) -> LayerSpectra:
    pairs = [mode_svd(a, m) for m in range(a.ndim)]
    return LayerSpectra(tuple(a.shape), [u for u, _ in pairs], [s for _, s in pairs])


def capture(
    model: nn.Module,
    names: Sequence[str],
    batch: torch.Tensor,
    labels: torch.Tensor | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Inputs (and, with labels, output gradients) of the named layers on one batch."""
    inputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def fwd(
            mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor, name: str = name
        ) -> None:
            inputs[name] = args[0].detach()
            if out.requires_grad:
                out.register_hook(lambda g, name=name: grads.__setitem__(name, g.detach()))

        handles.append(module.register_forward_hook(fwd))
    was_training = model.training
    try:
        model.eval()  # no dropout / drop-path in calibration
        if labels is None or loss_fn is None:
            with torch.no_grad():
                model(batch)
        else:
            model.zero_grad(set_to_none=True)
            loss_fn(model(batch), labels).backward()
            model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {n: (inputs[n], grads.get(n)) for n in names}


def stream_gradients(
    model: nn.Module,
    names: Sequence[str],
    batch: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    fn: Callable[[str, torch.Tensor, torch.Tensor], None],
    passes: int = 1,
) -> None:
    """``fn(name, input, output gradient)`` of each named layer on one eval-mode batch, called
    as the gradient arrives in backward; the input is dropped then. What ``capture`` returns,
    without holding every layer's gradient (and, with the model's recompute regions active,
    without its graph): the memory plan's probes use it within the budget they plan for.
    ``passes`` > 1 splits ``names`` into that many runs of consecutive layers, one forward and
    backward each: what is held between a layer's forward and its gradient is one run's
    inputs."""
    names = list(names)
    passes = max(1, min(passes, len(names)))
    if passes > 1:
        size = -(-len(names) // passes)
        for start in range(0, len(names), size):
            stream_gradients(model, names[start : start + size], batch, labels, loss_fn, fn)
        return
    inputs: dict[str, torch.Tensor] = {}
    handles = []

    def arrived(name: str, g: torch.Tensor) -> None:
        a = inputs.pop(name, None)
        if a is not None:
            fn(name, a, g.detach())

    for name in names:

        def fwd(
            mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor, name: str = name
        ) -> None:
            if replaying():  # a region's replay in backward: its copy, if still wanted
                if name in inputs:
                    inputs[name] = args[0].detach()
                return
            inputs[name] = args[0].detach()
            if out.requires_grad:
                out.register_hook(lambda g, name=name: arrived(name, g))

        handles.append(model.get_submodule(name).register_forward_hook(fwd))
    was_training = model.training
    try:
        model.eval()
        model.zero_grad(set_to_none=True)
        with recompute_in_eval():
            loss_fn(model(batch), labels).backward()
        model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
        inputs.clear()
        for h in handles:
            h.remove()


@torch.no_grad()
def map_inputs(
    model: nn.Module, names: Sequence[str], batch: torch.Tensor, fn: Callable[[torch.Tensor], T]
) -> dict[str, T]:
    """``fn`` of each named layer's input on one eval-mode batch, applied as the input passes
    (no input is kept: calibrating 72 layers holds one input at a time, not 72)."""
    found: dict[str, T] = {}
    handles = []
    for name in names:

        def pre(mod: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            found[name] = fn(args[0].detach())

        handles.append(model.get_submodule(name).register_forward_pre_hook(pre))
    was_training = model.training
    try:
        model.eval()
        model(batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


def streamed_ranks_by_eps(
    model: nn.Module, names: Sequence[str], batch: torch.Tensor, eps: float
) -> dict[str, tuple[int, ...]]:
    """``ranks_by_eps`` without keeping the inputs: each layer's HOSVD runs in its hook."""
    return map_inputs(model, names, batch, lambda a: spectra(a).ranks(eps))


def ranks_by_eps(acts: dict[str, torch.Tensor], eps: float) -> dict[str, tuple[int, ...]]:
    """Per-layer, per-mode ranks keeping ``eps`` of each mode's energy (one-time HOSVD)."""
    return {name: spectra(a).ranks(eps) for name, a in acts.items()}


def gradient_error(
    a: torch.Tensor, dy: torch.Tensor, spec: LayerSpectra, ranks: Sequence[int]
) -> float:
    """||dW_lowrank - dW||_F on the calibration batch for a truncated HOSVD at ``ranks``."""
    bases = [u[:, :r].to(torch.float64) for u, r in zip(spec.bases, ranks, strict=True)]
    a64 = a.to(torch.float64)
    approx = tucker_expand(tucker_core(a64, bases), bases)
    diff = (a64 - approx).reshape(-1, a.shape[-1])
    return float(torch.linalg.matrix_norm(dy.to(torch.float64).reshape(-1, dy.shape[-1]).T @ diff))


@dataclass
class BudgetChoice:
    ranks: dict[str, tuple[int, ...]]
    eps: dict[str, float]
    memory_mb: float
    error: float


def ranks_under_budget(
    captured: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    budget_mb: float,
    candidates: Sequence[float] = BUDGET_EPS,
) -> BudgetChoice:
    """Per-layer ranks minimising the summed gradient error within ``budget_mb`` MiB of
    compressed activations (knapsack by DP over memory in units of 1e-3 MiB, each layer's
    memory rounded up so the budget is never exceeded)."""
    if budget_mb <= 0:
        raise WasiToolError(f"activation budget must be positive, got {budget_mb} MB")
    options: dict[str, LayerOptions] = {}
    for name, (a, dy) in captured.items():
        if dy is None:
            raise WasiToolError(f"no gradient reached {name} on the calibration batch")
        options[name] = layer_options(a, dy, candidates)
    return choose_under_budget(options, budget_mb, candidates)


class LayerOptions(NamedTuple):
    """One layer's candidate ranks for the budget DP: (cost in 1e-3 MiB, gradient error,
    ranks, eps) each, and the input's shape."""

    shape: tuple[int, ...]
    choices: list[tuple[int, float, tuple[int, ...], float]]


def layer_options(
    a: torch.Tensor, dy: torch.Tensor, candidates: Sequence[float] = BUDGET_EPS
) -> LayerOptions:
    """The DP's choices for one layer, from its input and output gradient."""
    spec = spectra(a)
    seen: dict[tuple[int, ...], tuple[int, float, tuple[int, ...], float]] = {}
    for eps in candidates:
        ranks = spec.ranks(eps)
        if ranks not in seen:
            mem = tucker_elements(spec.shape, ranks) * 4 / MB
            seen[ranks] = (int(mem * 1000) + 1, gradient_error(a, dy, spec, ranks), ranks, eps)
    return LayerOptions(tuple(a.shape), list(seen.values()))


def choose_under_budget(
    layers: dict[str, LayerOptions], budget_mb: float, candidates: Sequence[float] = BUDGET_EPS
) -> BudgetChoice:
    """The DP of ``ranks_under_budget`` over layers' options (``layer_options``)."""
    if budget_mb <= 0:
        raise WasiToolError(f"activation budget must be positive, got {budget_mb} MB")
    names = list(layers)
    options = [layers[n].choices for n in names]
    capacity = int(budget_mb * 1000)
    need = sum(min(o[0] for o in opts) for opts in options)
    if need > capacity:
        raise WasiToolError(
            f"activation budget {budget_mb} MB is below the smallest choice "
            f"({need / 1000:.3f} MB for the lowest candidate eps {min(candidates)})"
        )
    picks, total_err = knapsack([[(o[0], o[1]) for o in opts] for opts in options], capacity)
    chosen = {name: options[li][picks[li]][2] for li, name in enumerate(names)}
    eps_of = {name: options[li][picks[li]][3] for li, name in enumerate(names)}
    memory = sum(tucker_elements(layers[n].shape, chosen[n]) * 4 / MB for n in names)
    return BudgetChoice(chosen, eps_of, memory, total_err)


def knapsack(
    options: Sequence[Sequence[tuple[int, float]]], capacity: int
) -> tuple[list[int], float]:
    """Pick one (cost, error) option per group, total cost <= capacity, least summed error.

    Dynamic programming over integer costs; among equal errors the smallest total cost wins.
    Returns (the chosen index per group, the summed error).
    """
    dp = np.full(capacity + 1, np.inf)
    dp[0] = 0.0
    picks = np.zeros((len(options), capacity + 1), dtype=np.int32)
    for gi, opts in enumerate(options):
        new = np.full(capacity + 1, np.inf)
        for ci, (cost, err) in enumerate(opts):
            if cost > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[cost:] = dp[: capacity + 1 - cost] + err
            better = cand < new
            new[better] = cand[better]
            picks[gi, better] = ci
        dp = new
    if not np.isfinite(dp).any():
        raise WasiToolError("no choice fits the budget")
    used = int(np.argmin(dp))  # argmin returns the smallest cost reaching the minimum
    total = float(dp[used])
    chosen = [0] * len(options)
    for gi in range(len(options) - 1, -1, -1):
        chosen[gi] = int(picks[gi, used])
        used -= options[gi][chosen[gi]][0]
    return chosen, total


class InputGram(NamedTuple):
    """A layer's input Gram matrix C = X^T X (I x I, float64) over ``rows`` input rows."""

    matrix: torch.Tensor
    rows: int


Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]


@torch.no_grad()
def calibrate_grams(
    model: nn.Module, names: Sequence[str], batches: Iterable[Batch]
) -> dict[str, InputGram]:
    """Each named linear's input Gram matrix C = X^T X, summed over ``batches`` in eval mode.

    A forward-pre hook adds x^T x (float64) of each input as it passes, over all leading
    dimensions (batch, tokens) flattened into rows, so memory holds one I x I matrix per layer
    and one batch's activations, whatever the number of batches: no input is kept.

    Args:
        model: the model; its train/eval mode is restored afterwards.
        names: the linear layers (``in_features`` each) to calibrate.
        batches: model inputs, or (input, row mask) pairs: the mask (the leading dimensions of
            each layer's input, e.g. (B, T) for token inputs; True = count the row) leaves out
            rows that change no output, such as padding tokens.

    Returns:
        {name: InputGram(C, n_rows)} in the order of ``names``.
    """
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = dict.fromkeys(names, 0)
    mask: list[torch.Tensor | None] = [None]
    handles = []
    for name in names:
        module = model.get_submodule(name)
        width = int(getattr(module, "in_features", 0))
        if width <= 0:
            raise WasiToolError(f"{name} is not a linear layer: it has no in_features")
        grams[name] = torch.zeros(width, width, dtype=torch.float64)

        def pre(
            mod: nn.Module, args: tuple[torch.Tensor, ...], name: str = name, width: int = width
        ) -> None:
            x = args[0].detach()
            if x.shape[-1] != width:
                raise WasiToolError(f"{name} got inputs of width {x.shape[-1]}, not {width}")
            keep = mask[0]
            if keep is not None:
                if tuple(keep.shape) != tuple(x.shape[:-1]):
                    raise WasiToolError(
                        f"a row mask of shape {tuple(keep.shape)} does not fit {name}'s input "
                        f"{tuple(x.shape)}"
                    )
                flat = x[keep.to(device=x.device, dtype=torch.bool)]
            else:
                flat = x.reshape(-1, width)
            flat = flat.to(torch.float64)
            grams[name].addmm_(flat.T, flat)
            rows[name] += int(flat.shape[0])

        handles.append(module.register_forward_pre_hook(pre))
    was_training = model.training
    # nn.TransformerEncoderLayer's fused eval kernel reads linear1/linear2's weights without
    # calling them: it would hide their inputs from the hooks
    fast_path = torch.backends.mha.get_fastpath_enabled()
    try:
        model.eval()  # no dropout / drop-path in calibration
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad():
            for item in batches:
                x, mask[0] = item if isinstance(item, tuple) else (item, None)
                model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        mask[0] = None
        model.train(was_training)
        for h in handles:
            h.remove()
    unseen = [n for n in names if rows[n] == 0]
    if unseen:
        raise WasiToolError(f"no calibration input reached {', '.join(unseen[:3])}")
    return {n: InputGram(grams[n], rows[n]) for n in names}


def row_mask(
    model: torch.nn.Module, x: torch.Tensor, y: object, ignore: int = -100
) -> torch.Tensor | None:
    """Which rows of a token batch change an output: a causal LM's positions up to its last
    labelled one (later ones are right padding), a text classifier's non-padding tokens;
    None (every row) for images. ``ignore``: the label of positions outside the loss (the
    training loss's IGNORE)."""
    family = family_of(model)
    if not family.reads_text or x.ndim != 2:
        return None
    if family.task(model).next_token and isinstance(y, torch.Tensor) and y.shape == x.shape:
        pos = torch.arange(x.shape[1]).expand_as(x)
        last = torch.where(y != ignore, pos, torch.full_like(pos, -1)).amax(dim=1)
        return pos <= last[:, None]
    pad = getattr(model.config, "pad_token_id", None)
    return None if pad is None else x != int(pad)
