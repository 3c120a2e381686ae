"""`wasi-tool federate`: federated fine-tuning on Flower, simulated on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from wasi_tool.cli import common
from wasi_tool.cli.common import console, human_bytes, user_errors
from wasi_tool.errors import WasiToolError

if TYPE_CHECKING:
    from wasi_tool.artifact.records import RoundRecord


def round_table(row: RoundRecord) -> Table:
    table = Table(
        title=f"round {row['round']}: global accuracy {row['test_accuracy']:.4f} "
        f"(loss {row['test_loss']:.4f}), {row['accepted']}/{len(row['clients'])} updates, "
        f"{row['seconds']:.1f} s"
    )
    for col in ("client", "status", "samples", "down", "up", "local loss", "local acc", "peak RSS"):
        table.add_column(col, justify="left" if col in ("client", "status") else "right")
    for c in row["clients"]:
        ok = c["status"] == "ok"
        table.add_row(
            str(int(c["partition_id"])) if "partition_id" in c else f"node {c['node']}",
            c["status"] if ok else f"{c['status']}: {c.get('reason', '')}",
            str(int(c["samples"])) if ok else "-",
            human_bytes(c.get("bytes_down", 0)),
            human_bytes(c["bytes_up"]) if "bytes_up" in c else "-",
            f"{c['train_loss']:.4f}" if ok else "-",
            f"{c['train_accuracy']:.4f}" if ok else "-",
            human_bytes(c["peak_rss_bytes"]) if ok else "-",
        )
    return table


def federate(
    checkpoint: Annotated[
        Path, typer.Argument(help="The starting wasi-tool artifact (every client has a copy).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact directory to write.")],
    data: Annotated[
        str,
        typer.Option(
            help="A dataset finetune reads; with --partition folders, a folder "
            "holding one dataset per client."
        ),
    ] = "digits",
    clients: Annotated[int, typer.Option(help="Clients simulated on this machine.")] = 4,
    partition: Annotated[
        str, typer.Option(help="iid, dirichlet:ALPHA (label skew) or folders.")
    ] = "iid",
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 5,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 1,
    method: Annotated[str, typer.Option(help="Any finetune method.")] = "wasi",
    targets: Annotated[str | None, typer.Option(help="As in finetune.")] = None,
    eps: Annotated[float, typer.Option(help="As in finetune.")] = 0.8,
    batch_size: Annotated[int, typer.Option(help="Local batch size.")] = 32,
    lr: Annotated[float, typer.Option(help="Start of the cosine over all rounds.")] = 0.05,
    lr_min: Annotated[float, typer.Option(help="End of the cosine.")] = 0.005,
    momentum: Annotated[float, typer.Option(help="As in finetune (0 for wsi/wasi).")] = 0.0,
    classes: Annotated[str | None, typer.Option(help="Train on these classes, e.g. 5,6,7.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Cap local steps per epoch.")] = None,
    seed: Annotated[int, typer.Option(help="Training and partition seed.")] = 233,
    min_clients: Annotated[int, typer.Option(help="Usable updates a round needs.")] = 1,
    server_lr: Annotated[
        float,
        typer.Option(
            help="The server's step on the round's mean update (1: FedAvg; IID data: the "
            "number of clients moves as far as training the same samples centrally)."
        ),
    ] = 1.0,
    test_data: Annotated[
        str | None, typer.Option(help="The server's test data (default: data's held-out split).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    json_path: common.JsonOut = None,
    resume: Annotated[bool, typer.Option(help="Continue after the last completed round.")] = False,
) -> None:
    """Federated fine-tuning (Flower): clients train locally, factored layers travel as factors."""
    with user_errors(), common.progress_to_stderr(json_path):
        from wasi_tool.federated import FederateConfig, run_federate

        try:
            picked = [int(v) for v in classes.split(",")] if classes else None
        except ValueError:
            raise WasiToolError(f"--classes takes integers, got {classes!r}") from None
        config = FederateConfig(
            method=method,
            targets=targets,
            eps=eps,
            epochs=local_epochs,
            batch_size=batch_size,
            lr=lr,
            lr_min=lr_min,
            momentum=momentum,
            classes=picked,
            max_steps=max_steps,
            seed=seed,
            clients=clients,
            partition=partition,
            rounds=rounds,
            min_clients=min_clients,
            server_lr=server_lr,
        )
        result = run_federate(
            checkpoint,
            data,
            config,
            out,
            overwrite=overwrite,
            resume=resume,
            test_data=test_data,
            on_round=lambda row: console.print(round_table(row)),
            note=lambda m: console.print(m, markup=False, highlight=False),
        )
        console.print(
            f"wrote {result.out}/ (model.safetensors, federated.json, federated.png, "
            f"manifest.json): global accuracy {result.final.get('test_accuracy', float('nan')):.4f}"
        )
        from wasi_tool.artifact.names import FEDERATED

        common.write_report_json(json_path, result.out, FEDERATED)
