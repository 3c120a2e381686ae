"""Splitting a training set among clients: IID, Dirichlet(alpha) label skew, or one pre-split
dataset folder per client.

A partition is a pure function of the labels, the client count, the rule and the seed, so every
client (in simulation or on its own device, given the same data) computes the same split and
takes its own share by its partition id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wasi_tool.errors import WasiToolError

MIN_PER_CLIENT = 2  # Dirichlet draws are repeated until each client has at least this many


@dataclass(frozen=True)
class PartitionSpec:
    """``iid``, ``dirichlet:ALPHA`` or ``folders`` (``--data DIR`` holds one dataset per client,
    its sub-folders or .npz files in name order)."""

    kind: str
    alpha: float | None = None

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        kind, _, arg = str(text).partition(":")
        if kind == "iid" and not arg:
            return cls("iid")
        if kind == "folders" and not arg:
            return cls("folders")
        if kind == "dirichlet":
            try:
                alpha = float(arg)
            except ValueError:
                alpha = float("nan")
            if not 0 < alpha < math.inf:
                raise WasiToolError(
                    f"dirichlet needs a positive, finite alpha, e.g. dirichlet:0.5 ({text!r})"
                )
            return cls("dirichlet", alpha)
        raise WasiToolError(f"partition must be iid, dirichlet:ALPHA or folders, got {text!r}")

    def __str__(self) -> str:
        return f"dirichlet:{self.alpha:g}" if self.kind == "dirichlet" else self.kind


def iid(n: int, clients: int, seed: int) -> list[np.ndarray]:
    """A seeded shuffle cut into ``clients`` near-equal shares (sorted indices)."""
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, clients)]


def dirichlet(labels: np.ndarray, clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label skew: each class's samples are divided among clients in proportions drawn from
    Dirichlet(alpha) (small alpha: each client sees few classes). Redrawn (same generator)
    until every client has at least MIN_PER_CLIENT samples, at most 100 times."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    for _ in range(100):
        shares: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                shares[k].extend(part.tolist())
        if min(len(s) for s in shares) >= MIN_PER_CLIENT:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shares]
    raise WasiToolError(
        f"dirichlet:{alpha} could not give each of {clients} clients {MIN_PER_CLIENT} samples "
        f"out of {len(labels)}: use fewer clients or a larger alpha"
    )


def split(labels: np.ndarray, clients: int, spec: PartitionSpec, seed: int) -> list[np.ndarray]:
    """The indices of each client's share of a training set with these labels."""
    if clients < 1:
        raise WasiToolError(f"need at least one client, got {clients}")
    if len(labels) < clients:
        raise WasiToolError(f"{len(labels)} training samples cannot be split among {clients}")
    if spec.kind == "iid":
        return iid(len(labels), clients, seed)
    if spec.kind == "dirichlet":
        assert spec.alpha is not None
        return dirichlet(labels, clients, spec.alpha, seed)
    raise WasiToolError(f"partition {spec} is not computed from labels")


def client_folders(root: Path, clients: int) -> list[Path]:
    """The per-client datasets under ``root`` (sub-folders and .npz files, in name order)."""
    root = Path(root)
    if not root.is_dir():
        raise WasiToolError(
            f"partition folders needs --data DIR with one dataset per client: {root}"
        )
    found = sorted(
        p
        for p in root.iterdir()
        if not p.name.startswith(".") and (p.is_dir() or p.suffix == ".npz")
    )
    if len(found) != clients:
        raise WasiToolError(
            f"{root} holds {len(found)} client datasets ({', '.join(p.name for p in found)}), "
            f"but {clients} clients were asked for"
        )
    return found
