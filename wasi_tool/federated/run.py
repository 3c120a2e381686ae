"""``run_federate``: a whole federated run simulated on one machine (the CLI's ``federate`` and
the recipe stage ``federate``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from wasi_tool.artifact.records import RoundRecord
from wasi_tool.federated.config import FederateConfig
from wasi_tool.federated.server import FederatedRun


def run_federate(
    source: str | Path,
    data: str | Path,
    config: FederateConfig,
    out: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    test_data: str | Path | None = None,
    on_round: Callable[[RoundRecord], None] = lambda row: None,
    note: Callable[[str], None] = lambda m: None,
    hook: Any = None,
) -> FederatedRun:
    """Simulate ``config.clients`` clients in this process (the Flower ClientApp through
    ``LocalGrid``) around the ServerApp's round loop, and write the artifact at ``out``.
    With the ``folders`` partition, client k reads the k-th dataset under ``data``."""
    from wasi_tool.federated.apps import client_app
    from wasi_tool.federated.partition import PartitionSpec, client_folders
    from wasi_tool.federated.server import serve
    from wasi_tool.federated.simulation import LocalGrid

    grid = LocalGrid(client_app, config.clients, hook=hook)
    if PartitionSpec.parse(config.partition).kind == "folders":
        for ctx, folder in zip(
            grid.contexts.values(), client_folders(Path(data), config.clients), strict=True
        ):
            ctx.node_config["data"] = str(folder)
    return serve(
        grid,
        source,
        data,
        config,
        Path(out),
        resume=resume,
        overwrite=overwrite,
        test_data=test_data,
        node_wait=0.0,
        on_round=on_round,
        note=note,
        check_data=True,  # this process sees every client's data: check it before round 1
    )
