"""What travels between server and clients, how it is checked, and how updates are aggregated.

Only trainable tensors travel (``requires_grad`` after the method prepared the model): factored
layers as their factors L, R; LoRA as its adapters (and the head); BSR as its trained blocks,
final norm and head. Frozen weights never travel: every device starts from the same artifact.
Arrays cross the wire as numpy arrays (Flower's ``Array``: ``np.save`` with
``allow_pickle=False``); the server checks each update against what it sent: the same names,
shapes and dtypes, and finite values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from wasi_tool.federated.aggregate import aggregate_factors, fedavg, server_step

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FactorPair:
    """Two travelling tensors whose product is the layer's weight (or weight update):
    ``left @ right`` (O x K times K x I). ``balanced``: LoRA's B, A (no orthonormal gauge)."""

    left: str
    right: str
    balanced: bool


def trainable_state(model: nn.Module) -> State:
    """The tensors that train (and so travel), by name, detached on the CPU."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_state_(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's parameters of the same names (shapes must match)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def factor_pairs(names: Sequence[str]) -> list[FactorPair]:
    """Factored layers (``x.L``, ``x.R``) and LoRA adapters (``x.lora_B.<a>.weight`` O x r,
    ``x.lora_A.<a>.weight`` r x I) among the travelling names."""
    have = set(names)
    pairs = []
    for name in names:
        if name.endswith(".L") and name[:-2] + ".R" in have:
            pairs.append(FactorPair(name, name[:-2] + ".R", balanced=False))
        elif ".lora_B." in name and name.replace(".lora_B.", ".lora_A.") in have:
            pairs.append(FactorPair(name, name.replace(".lora_B.", ".lora_A."), balanced=True))
    return pairs


def to_arrays(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().contiguous().numpy() for k, v in state.items()}


def check_update(
    arrays: Mapping[str, np.ndarray], reference: Mapping[str, torch.Tensor]
) -> str | None:
    """Why an update cannot be used (None when it can): names, shapes, dtypes, finiteness."""
    missing = sorted(set(reference) - set(arrays))
    extra = sorted(set(arrays) - set(reference))
    if missing or extra:
        return f"names differ: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, ref in reference.items():
        arr = arrays[name]
        if not isinstance(arr, np.ndarray):
            return f"{name}: not an array"
        if tuple(arr.shape) != tuple(ref.shape):
            return f"{name}: shape {tuple(arr.shape)}, expected {tuple(ref.shape)}"
        expected = str(ref.dtype).removeprefix("torch.")
        if str(arr.dtype) != expected:
            return f"{name}: dtype {arr.dtype}, expected {expected}"
        if not np.isfinite(arr).all():
            return f"{name}: {int((~np.isfinite(arr)).sum())} non-finite values"
    return None


def aggregate(
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    reference: State,
    server_lr: float = 1.0,
) -> State:
    """The new global state: factor pairs by the rank-K truncation of the weighted mean of
    their products (aggregate_factors), every other tensor by FedAvg. One update is taken
    as it is (the mean of one product is that product).

    ``server_lr`` != 1: the server's step G + lr (mean - G) (aggregate.server_step), with the
    previous global ``reference`` as one more member of the sums; factor pairs are truncated
    after the step, as for the plain mean."""
    tensors = [{k: torch.from_numpy(np.array(v)) for k, v in u.items()} for u in updates]
    coefficients, normalize = list(weights), True
    if server_lr != 1.0:
        tensors = [dict(reference), *tensors]
        coefficients, normalize = server_step(weights, server_lr), False
    elif len(tensors) == 1:
        return {k: tensors[0][k].clone() for k in reference}
    out: State = {}
    for pair in factor_pairs(list(reference)):
        rank = reference[pair.left].shape[1]
        left, right, _ = aggregate_factors(
            [t[pair.left] for t in tensors],
            [t[pair.right] for t in tensors],
            coefficients,
            rank,
            balanced=pair.balanced,
            normalize=normalize,
        )
        out[pair.left], out[pair.right] = left, right
    for name in reference:
        if name not in out:
            out[name] = fedavg([t[name] for t in tensors], coefficients, normalize=normalize)
    return out


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))
