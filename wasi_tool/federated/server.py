"""The server's side of a federated run: rounds over a Flower ``Grid``, checks, aggregation,
global evaluation, the round history, resumable state, and the final artifact.

Flower is imported inside the functions that use it: a plain training process never loads it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np

from wasi_tool import artifact
from wasi_tool.artifact.records import (
    CLIENT_METRICS,
    COMPRESS,
    FEDERATE,
    ClientRow,
    FederatedSummary,
    RoundRecord,
    StageRecord,
)
from wasi_tool.errors import WasiToolError
from wasi_tool.federated.config import FederateConfig
from wasi_tool.federated.local import Participant, build, evaluate_global
from wasi_tool.federated.payload import State, aggregate, check_update, to_arrays, trainable_state
from wasi_tool.methods import finalize_
from wasi_tool.models.loading import ModelSource
from wasi_tool.safe_read import loads_json
from wasi_tool.stages.common import layer_records, write_stage_artifact

log = logging.getLogger("wasi_tool.federated")

HISTORY = artifact.FEDERATED
PLOT = "federated.png"
STATE_FILE = "state.safetensors"
SCHEMA = "wasi-tool-federated/1"


@dataclass
class Task:
    """Everything a client needs to take part, sent with each round (JSON in a ConfigRecord):
    the starting artifact, the data, the recipe and the round."""

    model: str
    data: str
    config: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "data": self.data, "config": self.config})

    @classmethod
    def from_json(cls, text: str) -> Task:
        raw = loads_json(text, "the federated task")
        if (
            not isinstance(raw, dict)
            or not isinstance(raw.get("model"), str)
            or not isinstance(raw.get("data"), str)
            or not isinstance(raw.get("config"), dict)
        ):
            raise WasiToolError("the federated task needs a model and data (strings) and a config")
        return cls(raw["model"], raw["data"], raw["config"])


class Identity(TypedDict):
    """What makes a run the same run: its task (as sent to the clients) and test data."""

    task: object  # the task's JSON (Task.to_json, parsed)
    test_data: str


class SavedState(TypedDict):
    """The server state saved after each completed round (beside the global tensors)."""

    identity: Identity
    history: list[RoundRecord]


@dataclass
class FederatedRun:
    out: Path
    history: list[RoundRecord] = field(default_factory=list)
    final: dict[str, float | None] = field(default_factory=dict)


def state_dir(out: Path) -> Path:
    """Where a run writing ``out`` keeps its server state: ``<out>.fedstate/`` beside it."""
    return out.parent / f"{out.name}.fedstate"


def save_state(directory: Path, state: State, meta: SavedState) -> None:
    """Global tensors and the history in one safetensors file, replaced atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{STATE_FILE}.tmp"
    artifact.save_weights(tmp, state, {"fedstate": meta})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, directory / STATE_FILE)


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def check_history(history: object, where: str, rounds: int) -> list[RoundRecord]:
    """A saved round history, typed and bounded: a list of at most ``rounds`` records, record
    k (1-based) for round k with its clients (objects), accepted count and test figures."""
    if not isinstance(history, list):
        kind = type(history).__name__
        raise WasiToolError(f"{where}: history must be a list of rounds, got {kind}")
    if len(history) > rounds:
        raise WasiToolError(f"{where}: {len(history)} rounds saved, this run has {rounds}")
    for k, row in enumerate(history, 1):
        if (
            not isinstance(row, dict)
            or row.get("round") != k
            or not isinstance(row.get("clients"), list)
            or len(row["clients"]) > 10_000
            or not all(isinstance(c, dict) and {"node", "status"} <= set(c) for c in row["clients"])
            or not isinstance(row.get("accepted"), int)
            or not all(_number(row.get(key)) for key in ("test_loss", "test_accuracy", "seconds"))
        ):
            raise WasiToolError(
                f"{where}: history record {k} is not a round record (round {k}, clients, "
                "accepted, test_loss, test_accuracy)"
            )
    return cast(list[RoundRecord], history)


def load_state(directory: Path, identity: Identity, rounds: int) -> tuple[State, SavedState]:
    """The saved global tensors and the validated record (identity, history) of a run."""
    where = str(directory / STATE_FILE)
    tensors, meta = artifact.load_weights(directory / STATE_FILE)
    saved = loads_json(meta.get("fedstate", "{}"), f"{where} fedstate")
    if not isinstance(saved, dict):
        kind = type(saved).__name__
        raise WasiToolError(f"{where}: the saved state must be an object, got {kind}")
    history = check_history(saved.get("history"), where, rounds)
    if saved.get("identity") != identity:
        raise WasiToolError(
            f"{directory} was made with other settings or data; resume with the same command, "
            "or start again with --overwrite"
        )
    return tensors, {"identity": identity, "history": history}


def _arrays_record(arrays: dict[str, np.ndarray]) -> Any:
    from flwr.app import Array, ArrayRecord

    return ArrayRecord.from_array_dict({k: Array(v) for k, v in arrays.items()})


def serialized_bytes(record: Any) -> int:
    """Bytes of the serialised arrays in a Flower ArrayRecord (np.save buffers)."""
    return int(sum(len(a.data) for a in record.values()))


def _wait_for_nodes(grid: Any, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count or time.monotonic() > deadline:
            return nodes[:count]
        time.sleep(1.0)


def _read_reply(reply: Any, reference: State) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The update and metrics of a reply, or WasiToolError saying why it is unusable."""
    if reply.has_error():
        raise WasiToolError(f"client error: {reply.error.reason}")
    content = reply.content
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        raise WasiToolError("reply lacks its arrays or metrics")
    try:
        arrays = {k: a.numpy() for k, a in content.array_records["arrays"].items()}
    except Exception as exc:  # a malformed buffer; numpy refuses pickles (allow_pickle=False)
        raise WasiToolError(f"unreadable arrays: {exc}") from None
    metrics = {k: float(v) for k, v in content.metric_records["metrics"].items()}
    why = check_update(arrays, reference)
    if why is not None:
        raise WasiToolError(why)
    if not metrics.get("samples", 0) > 0:
        raise WasiToolError("reply reports no training samples")
    return arrays, metrics


def _names(classes: list[str]) -> str:
    shown = ", ".join(map(str, classes[:6])) + (", ..." if len(classes) > 6 else "")
    return f"{len(classes)} classes ({shown})"


def check_partitions(
    server: Participant,
    data: str | Path,
    config: FederateConfig,
    test_data: str | Path | None = None,
) -> None:
    """Before any round, where the server sees every client's data (a simulation): each
    client's share has at least MIN_PER_CLIENT training samples, and every client's data has
    one class set, the server's (the server scores its head on every label). One line saying
    which client and what to change; nothing has been written yet."""
    from wasi_tool.data.datasets import _labels_of
    from wasi_tool.data.text import load_task_data
    from wasi_tool.federated.partition import MIN_PER_CLIENT, PartitionSpec, client_folders, split

    local = config.local_config()
    spec = PartitionSpec.parse(config.partition)

    def load(where: str | Path) -> Any:
        return load_task_data(
            server.loaded, where, server.transform.size, local.val_fraction, local.seed,
            local.classes,
        )  # fmt: skip

    sizes: list[tuple[str, int]] = []
    if spec.kind == "folders":
        first: tuple[str, list[str]] | None = None
        for folder in client_folders(Path(data), config.clients):
            splits = load(folder)
            first = first or (folder.name, list(splits.classes))
            for name, classes in (first, (test_data and "the test data", server.classes)):
                if name and list(splits.classes) != list(classes):
                    raise WasiToolError(
                        f"partition folders: client {folder.name} has "
                        f"{_names(list(splits.classes))}, {name} has {_names(list(classes))}; "
                        "every client needs the same class set"
                    )
            sizes.append((f"client {folder.name}", len(splits.train)))
    else:
        train = server.train if test_data is None else load(data).train
        if spec.kind == "iid":
            n = len(train)  # type: ignore[arg-type]
            if n < config.clients:
                raise WasiToolError(
                    f"{n} training samples cannot be split among {config.clients} clients"
                )
            sizes = [(f"client {k}", n // config.clients + (k < n % config.clients))
                     for k in range(config.clients)]  # fmt: skip
        else:
            labels = np.asarray(_labels_of(train))
            parts = split(labels, config.clients, spec, config.seed)
            sizes = [(f"client {k}", len(p)) for k, p in enumerate(parts)]
    for who, size in sizes:
        if size < MIN_PER_CLIENT:
            raise WasiToolError(
                f"partition {spec}: {who} gets {size} training sample(s), fewer than "
                f"{MIN_PER_CLIENT}; use fewer clients or more data"
            )


def run_round(
    grid: Any, rnd: int, task: Task, state: State, config: FederateConfig, wait: float
) -> tuple[State | None, list[ClientRow]]:
    """Send the global state to the clients, collect, check and aggregate their updates.
    Returns the new state (None when fewer than min_clients updates were usable) and one
    record per client: status, reason, bytes down/up, local figures."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    nodes = _wait_for_nodes(grid, config.clients, wait)
    arrays = to_arrays(state)
    messages: list[Any] = []
    rows: dict[int, ClientRow] = {}
    for node in nodes:
        record = _arrays_record(arrays)
        content = RecordDict(
            {
                "arrays": record,
                "config": ConfigRecord({"task": task.to_json(), "round": rnd}),
            }
        )
        messages.append(Message(content, node, MessageType.TRAIN, group_id=str(rnd)))
        rows[node] = {"node": node, "bytes_down": serialized_bytes(record), "status": "missing"}
    replies = list(grid.send_and_receive(messages, timeout=config.round_timeout))
    updates, weights = [], []
    for reply in replies:
        node = reply.metadata.src_node_id
        row = rows.setdefault(node, {"node": node, "bytes_down": 0})
        if not reply.has_error() and "arrays" in reply.content.array_records:
            row["bytes_up"] = serialized_bytes(reply.content.array_records["arrays"])
        try:
            update, metrics = _read_reply(reply, state)
        except WasiToolError as exc:
            row["status"], row["reason"] = "dropped", str(exc)
            log.warning("round %d: dropped the update of node %s: %s", rnd + 1, node, exc)
            continue
        row["status"] = "ok"
        for key in CLIENT_METRICS:  # what a client reports; anything else is not recorded
            if key in metrics:
                row[key] = metrics[key]  # type: ignore[literal-required]
        updates.append(update)
        weights.append(metrics["samples"])
    for row in rows.values():
        if row["status"] == "missing":
            row["reason"] = "no reply"
            log.warning("round %d: no reply from node %s", rnd + 1, row["node"])
    records = sorted(rows.values(), key=lambda r: (r.get("partition_id", 1e9), r.get("node", 0)))
    if len(updates) < config.min_clients:
        return None, records
    return aggregate(updates, weights, state, config.server_lr), records


def serve(
    grid: Any,
    source: str | Path,
    data: str | Path,
    config: FederateConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    test_data: str | Path | None = None,
    node_wait: float = 300.0,
    on_round: Callable[[RoundRecord], None] = lambda row: None,
    note: Callable[[str], None] = lambda m: None,
    check_data: bool = False,
) -> FederatedRun:
    """Run ``config.rounds`` rounds over ``grid`` and write the final artifact at ``out``.

    After each completed round the global state and history are saved atomically in
    ``<out>.fedstate/``; ``resume`` continues from the last completed round. A round with
    fewer than ``min_clients`` usable updates stops the run (WasiToolError) with that state
    kept, so a later ``resume`` retries it; a run that fails before its first round completes
    leaves nothing. With ``check_data`` (a simulation, whose server sees every client's data)
    the partitions are checked before any round (``check_partitions``).
    """
    out = Path(out)
    sdir = state_dir(out)
    if resume and overwrite:
        raise WasiToolError("--resume continues a run; --overwrite starts it again: pick one")
    if not resume:
        artifact.check_output_dir(out, overwrite)
        if (sdir / STATE_FILE).exists() and not overwrite:
            raise WasiToolError(
                f"an interrupted run left {sdir}; pass --resume to continue it or --overwrite"
            )
    elif out.exists():
        raise WasiToolError(f"output {out} already exists: that run has finished")
    task = Task(str(source), str(data), config.to_dict())
    identity: Identity = {"task": json.loads(task.to_json()), "test_data": str(test_data)}
    server = build(ModelSource(checkpoint=Path(source)), data, config, None, note, test_data)
    if check_data:
        check_partitions(server, data, config, test_data)
    state = trainable_state(server.model)
    history: list[RoundRecord] = []
    if resume and (sdir / STATE_FILE).exists():
        state, saved = load_state(sdir, identity, config.rounds)
        history = list(saved["history"])
        note(f"resumed after round {len(history)} from {sdir / STATE_FILE}")
    elif resume:
        raise WasiToolError(f"nothing to resume: no server state at {sdir / STATE_FILE}")
    else:
        save_state(sdir, state, {"identity": identity, "history": history})
    try:
        _rounds(grid, task, server, state, config, history, sdir, identity, node_wait, on_round)
    except BaseException:
        if not resume and not history:  # no round completed: nothing worth keeping
            import shutil

            shutil.rmtree(sdir, ignore_errors=True)
        raise
    result = write_federated_artifact(server, config, data, out, history, overwrite)
    import shutil

    shutil.rmtree(sdir, ignore_errors=True)
    return result


def _rounds(
    grid: Any,
    task: Task,
    server: Participant,
    state: State,
    config: FederateConfig,
    history: list[RoundRecord],
    sdir: Path,
    identity: Identity,
    node_wait: float,
    on_round: Callable[[RoundRecord], None],
) -> None:
    """The rounds after ``history``: each one's state and record saved when it completes."""
    for rnd in range(len(history), config.rounds):
        start = time.perf_counter()
        new, clients = run_round(grid, rnd, task, state, config, node_wait)
        if new is None:
            accepted = sum(c["status"] == "ok" for c in clients)
            kept = (
                f"the state after round {rnd} is kept in {sdir} (--resume retries)"
                if history
                else "no round completed, nothing was saved"
            )
            raise WasiToolError(
                f"round {rnd + 1}: {accepted} usable update(s), min_clients is "
                f"{config.min_clients}; {kept}"
            )
        state = new
        from wasi_tool.federated.payload import load_state_

        load_state_(server.model, state)
        test = evaluate_global(server, config.batch_size)
        row: RoundRecord = {
            "round": rnd + 1,
            "clients": clients,
            "accepted": sum(c["status"] == "ok" for c in clients),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "seconds": round(time.perf_counter() - start, 3),
        }
        history.append(row)
        save_state(sdir, state, {"identity": identity, "history": history})
        on_round(row)


def write_federated_artifact(
    server: Participant,
    config: FederateConfig,
    data: str | Path,
    out: Path,
    history: list[RoundRecord],
    overwrite: bool,
) -> FederatedRun:
    model = server.model
    prepared = server.prepared
    finalize_(model, config.method)
    model.eval()
    summary: FederatedSummary = {
        "schema": SCHEMA,
        "clients": config.clients,
        "partition": config.partition,
        "rounds": config.rounds,
        "local_epochs": config.epochs,
        "method": config.method,
        "data": str(data),
        "test": server.description,
        "history": history,
    }
    stages = [StageRecord(FEDERATE, config.to_dict(), data=str(data))]
    if prepared.compress_report is not None:
        stages.insert(0, StageRecord(COMPRESS, prepared.compress_report["config"]))
    final = {k: history[-1][k] for k in ("test_loss", "test_accuracy")} if history else {}

    def extra(staging: Path) -> None:
        artifact.write_json(staging / HISTORY, summary)
        try:
            from wasi_tool.federated.report import plot_history

            plot_history(history, staging / PLOT)
        except ImportError:  # matplotlib is optional
            pass

    write_stage_artifact(
        server.loaded,
        out,
        stages,
        layer_records(model, prepared.targets, prepared.act_ranks),
        {"stage": FEDERATE, "final": final},
        extra=extra,
        overwrite=overwrite,
        federated=summary,
    )
    return FederatedRun(out, history, final)


def round_nodes(history: Iterable[RoundRecord]) -> int:
    return max((len(r["clients"]) for r in history), default=0)
