"""`wasi-tool federate`: federated fine-tuning on Flower, simulated on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from wasi_tool.cli import common
from wasi_tool.cli.common import console, default, human_bytes, user_errors
from wasi_tool.cli.defaults import FederateConfig
from wasi_tool.cli.settings import flat_settings, takes_settings

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


@takes_settings("FederateConfig", skip={"epochs", "memory_budget"})
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
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = default(
        FederateConfig, "epochs"
    ),
    clip: Annotated[float, typer.Option(help="Global gradient-norm clip (0: none).")] = default(
        FederateConfig, "clip"
    ),
    test_data: Annotated[
        str | None, typer.Option(help="The server's test data (default: data's held-out split).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    json_path: common.JsonOut = None,
    resume: Annotated[bool, typer.Option(help="Continue after the last completed round.")] = False,
    **settings: object,
) -> None:
    """Federated fine-tuning (Flower): clients train locally, factored layers travel as factors.
    Every FederateConfig setting is an option, as in finetune (the method's own options too)."""
    with user_errors(), common.progress_to_stderr(json_path):
        from wasi_tool.federated import FederateConfig, run_federate

        config = FederateConfig.from_flat(
            flat_settings("FederateConfig", settings),
            epochs=local_epochs,
            clip=clip if clip > 0 else None,
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
