"""The Flower apps (current Message API): ``client_app`` trains a wasi-tool model on the
device's own data; ``server_app`` runs the rounds (wasi_tool.federated.server).

Deployment: each SuperNode is started with ``--node-config`` giving its ``partition-id`` and
``num-partitions`` (and optionally ``data``, its own dataset, and ``model``, its copy of the
starting artifact); the ServerApp reads ``model``, ``data``, ``out`` and ``settings`` (a JSON
file of FederateConfig fields) from the run config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from wasi_tool.artifact.records import RoundRecord
from wasi_tool.federated.config import FederateConfig, read_settings, settings_config
from wasi_tool.federated.local import Participant, build, train_round
from wasi_tool.federated.payload import to_arrays
from wasi_tool.federated.server import Task, _arrays_record, serve
from wasi_tool.models.loading import ModelSource

log = logging.getLogger("wasi_tool.federated")

client_app = ClientApp()
server_app = ServerApp()

_CACHE: dict[str, Participant] = {}  # a client keeps its prepared model between rounds


def _node_value(context: Context, key: str, default: Any) -> Any:
    return context.node_config.get(key, default)


def participant(task: Task, context: Context) -> tuple[Participant, int, FederateConfig]:
    config = settings_config(task.config, "the federated task's settings")
    client = int(_node_value(context, "partition-id", 0))
    parts = int(_node_value(context, "num-partitions", config.clients))
    model = str(_node_value(context, "model", task.model))
    data = str(_node_value(context, "data", task.data))
    changes: dict[str, Any] = {}
    if parts != config.clients:
        changes["clients"] = parts
    if "data" in context.node_config and config.partition != "folders":
        changes["partition"] = "folders"  # the device's own dataset, all of it
    if changes:
        config = FederateConfig.from_dict({**task.config, **changes})
    key = json.dumps([model, data, config.to_dict(), client], sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = build(ModelSource(checkpoint=Path(model)), data, config, client)
    return _CACHE[key], client, config


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on this node's data."""
    import torch

    task = Task.from_json(str(msg.content.config_records["config"]["task"]))
    rnd = int(msg.content.config_records["config"]["round"])  # type: ignore[arg-type]
    part, client, config = participant(task, context)
    state = {
        k: torch.from_numpy(a.numpy().copy())
        for k, a in msg.content.array_records["arrays"].items()
    }
    result = train_round(part, state, config.round_config(rnd, client))
    metrics: dict[str, Any] = {
        **result.metrics,
        "samples": float(result.samples),
        "partition_id": float(client),
    }
    content = RecordDict(
        {"arrays": _arrays_record(to_arrays(result.state)), "metrics": MetricRecord(metrics)}
    )
    return Message(content, reply_to=msg)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config (``model``, ``data``, ``out``,
    ``settings``: a JSON file of FederateConfig fields; ``resume``)."""
    cfg = context.run_config
    settings = cfg.get("settings")
    config = read_settings(str(settings)) if settings else FederateConfig()
    out = Path(str(cfg["out"]))
    resume = bool(cfg.get("resume", False))

    def report(row: RoundRecord) -> None:
        log.warning(
            "round %d: %d/%d updates, global accuracy %.4f",
            row["round"],
            row["accepted"],
            len(row["clients"]),
            row["test_accuracy"],
        )

    serve(
        grid,
        str(cfg["model"]),
        str(cfg["data"]),
        config,
        out,
        resume=resume,
        overwrite=not resume and bool(cfg.get("overwrite", False)),
        on_round=report,
    )


__all__ = ["ArrayRecord", "client_app", "server_app"]
