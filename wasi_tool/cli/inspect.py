"""`wasi-tool info` (what an artifact is and how it was made) and `wasi-tool eval` (accuracy
and loss of a model on a dataset)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from wasi_tool.cli import common
from wasi_tool.cli.common import console, human_bytes
from wasi_tool.errors import WasiToolError

if TYPE_CHECKING:  # the library (torch) loads when the command runs, not to parse its flags
    from wasi_tool.artifact import ArtifactInfo
    from wasi_tool.stages.evaluate import EvalResult

# The settings `info` shows of each stage (all of them are in --json).
STAGE_KEYS = (
    "method", "targets", "eps", "rank_ratio", "act_ranks", "act_eps", "epochs", "batch_size",
    "lr", "seed", "classes", "max_steps", "memory_mode", "lossy", "onnx", "merge", "int8",
    "opset", "rounds", "clients",
)  # fmt: skip


# A table of thousands of rows takes rich seconds to lay out; --json has every layer.
SHOWN_LAYERS = 500


def info(
    artifact: Annotated[Path, typer.Argument(help="A wasi-tool artifact directory.")],
    json_path: common.JsonOut = None,
) -> None:
    """What an artifact is: its kind, how it was made (stage history), its layers and ranks,
    its files with sizes and sha256 (checked against the manifest)."""
    from wasi_tool.artifact import describe

    with common.user_errors():
        found = describe(artifact)
        common.write_json(json_path, found)
        if not common.is_stdout(json_path):
            render_info(found)
        bad = [n for n, e in found["files"].items() if e["status"] in ("missing", "mismatch")]
        if bad:  # shown above (and in the JSON); a script sees it in the exit code too
            raise WasiToolError(
                f"{artifact}: {len(bad)} file(s) do not match the manifest: {', '.join(bad)}"
            )


def _short(value: Any, width: int = 60) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _settings(stage: Mapping[str, object]) -> str:
    config = stage.get("config")
    if not isinstance(config, dict):
        return ""
    shown = [
        f"{k}={_short(config[k])}" for k in STAGE_KEYS if config.get(k) not in (None, False, [], "")
    ]
    return " ".join(shown)


def render_info(found: ArtifactInfo) -> None:
    model, source = found["model"], found["source"]
    kwargs = " ".join(f"{k}={v}" for k, v in (model.get("kwargs") or {}).items())
    console.print(f"[bold]{found['path']}[/]: a {found['kind']} artifact, made {found['created']}")
    console.print(f"model: {model.get('arch')} {kwargs}", markup=False, highlight=False)
    where = source.get("path") or ""
    seed = f" (seed {source['seed']})" if source.get("kind") == "random-init" else ""
    console.print(f"source: {source.get('kind')} {where}{seed}", markup=False, highlight=False)
    versions = " ".join(f"{k} {v}" for k, v in found["versions"].items())
    console.print(f"made with: {versions}", markup=False, highlight=False)

    history = Table(title="how it was made")
    for col in ("#", "stage", "settings", "data"):
        history.add_column(col)
    for i, stage in enumerate(found["stages"], 1):
        history.add_row(
            str(i), str(stage.get("stage")), _settings(stage), str(stage.get("data", ""))
        )
    console.print(history)

    if found["layers"]:
        layers = Table(title=f"layers ({len(found['layers'])})")
        for col in ("layer", "O x I", "rank K", "activation ranks"):
            layers.add_column(col, justify="left" if col == "layer" else "right")
        for row in found["layers"][:SHOWN_LAYERS]:
            act = row.get("act_ranks")
            layers.add_row(
                row.get("name", ""),
                f"{row.get('out_features')} x {row.get('in_features')}",
                "dense" if row.get("rank") is None else str(row["rank"]),
                ", ".join(map(str, act)) if act else "-",
            )
        console.print(layers)
        if len(found["layers"]) > SHOWN_LAYERS:
            more = len(found["layers"]) - SHOWN_LAYERS
            console.print(f"  ... and {more} more layers (all of them in --json)", markup=False)

    files = Table(title=f"files ({human_bytes(found['total_bytes'])})")
    for col in ("file", "size", "sha256", "check"):
        files.add_column(col, justify="right" if col == "size" else "left")
    for name, entry in found["files"].items():
        files.add_row(
            name,
            human_bytes(entry["bytes"] or 0),
            entry["sha256"] or "",
            entry["status"],
        )
    console.print(files)
    for name, role in (found.get("outputs") or {}).items():
        console.print(f"  {name}: {role}", markup=False, highlight=False)


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise WasiToolError(f"--classes takes comma-separated integers, got {text!r}") from None


def evaluate(
    checkpoint: common.Checkpoint = None,
    data: Annotated[str, typer.Option(help=common.DATA_HELP, show_default=False)] = "digits",
    split: Annotated[str, typer.Option(help="test (held out) | train.")] = "test",
    classes: Annotated[
        str | None,
        typer.Option(help="Class subset, e.g. 5,6,7,8,9 (default: the finetune stage's)."),
    ] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(help="Held-out share of a dataset without a test split (default: as tuned)."),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the split (default: the finetune stage's).")
    ] = None,
    seq_len: Annotated[
        int | None, typer.Option(help="Tokens per example of causal-LM data.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Evaluation batch.")] = 64,
    predictions: Annotated[
        Path | None,
        typer.Option(help="Write one CSV row per example: index, label, prediction, names."),
    ] = None,
    arch: common.Arch = None,
    num_classes: common.NumClasses = None,
    img_size: common.ImgSize = None,
    trust_pickle: common.TrustPickle = False,
    random_init: common.RandomInit = False,
    seed_init: common.SeedInit = 0,
    task: common.Task = None,
    model_class: common.ModelClass = None,
    json_path: common.JsonOut = None,
) -> None:
    """Accuracy and loss of a model on a dataset's held-out split (the split finetune used)."""
    from wasi_tool.stages.evaluate import run_eval

    with common.user_errors():
        source = common.model_source(
            checkpoint, arch, num_classes, img_size, trust_pickle, random_init, seed_init,
            task=task, model_class=model_class,
        )  # fmt: skip
        with console.status("evaluating..."):
            result = run_eval(
                source,
                data,
                split=split,
                batch_size=batch_size,
                classes=_ints(classes),
                val_fraction=val_fraction,
                seed=seed,
                seq_len=seq_len,
                predictions=predictions,
            )
        payload = result.to_dict()
        if predictions is not None:
            payload["predictions_file"] = str(predictions)
        common.write_json(json_path, payload)
    if not common.is_stdout(json_path):
        render_eval(result, predictions)


def render_eval(result: EvalResult, predictions: Path | None) -> None:
    table = Table(title=f"{result.loaded.arch} on {result.data} ({result.split} split)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("examples", f"{result.examples:,}")
    table.add_row("accuracy (top-1)", f"{result.accuracy:.4f}")
    table.add_row("loss (mean cross-entropy)", f"{result.loss:.4f}")
    s = result.settings
    origin = "the finetune stage's" if s["from_finetune_stage"] else "given / defaults"
    table.add_row(
        "split settings",
        f"val fraction {s['val_fraction']}, seed {s['seed']}, classes "
        f"{_short(s['classes']) if s['classes'] else 'all'} ({origin})",
    )
    console.print(table)
    if predictions is not None:
        console.print(f"wrote {predictions}", markup=False, highlight=False)
