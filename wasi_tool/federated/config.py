"""The settings of a federated run: a fine-tuning recipe run locally by each client, plus the
federation (clients, partition, rounds)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from wasi_tool.config import check_settings, register_config
from wasi_tool.errors import WasiToolError
from wasi_tool.federated.partition import PartitionSpec
from wasi_tool.safe_read import read_json
from wasi_tool.training.config import FinetuneConfig

MAX_COUNT = 10_000  # clients, rounds: a simulation keeps one record per client per round
MAX_SETTINGS_BYTES = 1 << 20


@register_config
@dataclass
class FederateConfig(FinetuneConfig):
    """A finetune recipe (every FinetuneConfig field; ``epochs`` are local epochs per round)
    and the federation.

    Args:
        epochs: local epochs per round.
        clients: how many clients (simulation: partitions of ``data``).
        partition: ``iid``, ``dirichlet:ALPHA`` (label skew) or ``folders``.
        rounds: federated rounds; the learning rate follows one cosine from lr to lr_min over
            all rounds (each round runs its own stretch of it locally).
        min_clients: a round needs at least this many accepted updates (default 1); below it
            the round fails, and the run stops with the last completed round saved.
        round_timeout: seconds the server waits for the replies of a round (None: no limit).
        server_lr: the server's learning rate on the round's mean update (1: plain FedAvg).
            Averaging n clients' local steps moves the model about as far as one client's
            steps; with IID data, server_lr = n moves it about as far as the same samples
            trained centrally (a larger step along the averaged direction).
    """

    stage: ClassVar[str] = "federate"

    epochs: int = 1
    clients: int = 4
    partition: str = "iid"
    rounds: int = 5
    min_clients: int = 1
    round_timeout: float | None = None
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        PartitionSpec.parse(self.partition)
        for name in ("clients", "rounds", "min_clients"):
            if int(getattr(self, name)) < 1:
                raise WasiToolError(f"{name} must be >= 1, got {getattr(self, name)}")
            if int(getattr(self, name)) > MAX_COUNT:
                raise WasiToolError(f"{name} must be <= {MAX_COUNT}, got {getattr(self, name)}")
        if self.min_clients > self.clients:
            raise WasiToolError(f"min_clients {self.min_clients} > clients {self.clients}")
        if self.round_timeout is not None and not self.round_timeout > 0:
            raise WasiToolError(f"round_timeout must be positive, got {self.round_timeout}")
        if self.memory_budget is not None:
            raise WasiToolError("memory_budget is not supported in a federated run (yet)")
        if not 0 < self.server_lr <= 100:
            raise WasiToolError(f"server_lr must be in (0, 100], got {self.server_lr}")

    def round_config(self, rnd: int, client: int) -> FinetuneConfig:
        """The local recipe of client ``client`` in round ``rnd`` (0-based): this round's
        stretch of the global cosine, a seed of its own (round 0, client 0: the run's seed)."""
        keys = FinetuneConfig.setting_hints()
        base = {k: v for k, v in self.settings().items() if k in keys}

        def at(t: float) -> float:
            return self.lr_min + (self.lr - self.lr_min) * (1 + math.cos(math.pi * t)) / 2

        base.update(
            lr=at(rnd / self.rounds),
            lr_min=at((rnd + 1) / self.rounds),
            seed=self.seed + 1000 * rnd + client,
        )
        return FinetuneConfig.from_flat(base)

    def local_config(self) -> FinetuneConfig:
        """The recipe a client is prepared with (round 0, client 0)."""
        return self.round_config(0, 0)


def settings_config(data: Any, where: str) -> FederateConfig:
    """A FederateConfig from settings read from a file or a message: an object of known fields,
    each of its type with finite numbers (``config.check_settings``), then the config's own
    range checks. Every refusal is one line naming the setting."""
    return FederateConfig.from_dict(check_settings(FederateConfig, data, where))


def read_settings(path: str | Path) -> FederateConfig:
    """The Flower ServerApp's ``settings`` file (JSON, bounded in size and depth)."""
    return settings_config(read_json(Path(path), max_bytes=MAX_SETTINGS_BYTES), str(path))
