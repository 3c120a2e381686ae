"""`wasi-tool export`: safetensors (factored or merged) and ONNX, checked against torch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from wasi_tool.cli import common
from wasi_tool.cli.common import console, default, human_bytes
from wasi_tool.cli.defaults import ExportConfig as E  # its defaults, without torch

if TYPE_CHECKING:  # the library (torch) loads when the command runs, not to parse its flags
    from wasi_tool.stages.export import ExportConfig, ExportResult


def export(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Export directory to write.", show_default=False)
    ],
    checkpoint: common.Checkpoint = None,
    onnx: Annotated[
        bool,
        typer.Option(
            "--onnx", help="Write model.onnx (what export writes when neither flag is given)."
        ),
    ] = False,
    safetensors: Annotated[
        bool,
        typer.Option(
            "--safetensors",
            help="Write the weights as model.safetensors; with --onnx, both files.",
        ),
    ] = False,
    merge: Annotated[
        bool, typer.Option(help="Dense weights under timm names (no wasi-tool needed to load).")
    ] = default(E, "merge"),
    int8: Annotated[bool, typer.Option(help="Also an int8 ONNX (dynamic quantisation).")] = default(
        E, "int8"
    ),
    ort_opt: Annotated[
        str | None, typer.Option(help="Also an onnxruntime-optimised copy: basic|extended|all.")
    ] = default(E, "ort_opt"),
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17).")] = default(E, "opset"),
    atol: Annotated[
        float, typer.Option(help="Fail when max|onnx - torch| > atol x max(1, |logits|).")
    ] = default(E, "atol"),
    min_agreement: Annotated[
        float, typer.Option(help="Fail an int8 export below this top-1 agreement.")
    ] = default(E, "min_agreement"),
    check_batch: Annotated[int, typer.Option(help="The larger check batch.")] = default(
        E, "check_batch"
    ),
    data: Annotated[
        str | None, typer.Option(help="Also check on this dataset's first test images.")
    ] = default(E, "data"),
    arch: common.Arch = None,
    num_classes: common.NumClasses = None,
    img_size: common.ImgSize = None,
    trust_pickle: common.TrustPickle = False,
    random_init: common.RandomInit = False,
    seed_init: common.SeedInit = 0,
    model_class: common.ModelClass = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    json_path: common.JsonOut = None,
) -> None:
    """Export weights (factored or merged) and ONNX (two MatMuls per factored linear)."""
    from wasi_tool.stages.export import ExportConfig, run_export

    with common.user_errors(), common.progress_to_stderr(json_path):
        config = ExportConfig(
            onnx=onnx or not safetensors,
            merge=merge,
            int8=int8,
            ort_opt=ort_opt,
            opset=opset,
            atol=atol,
            min_agreement=min_agreement,
            check_batch=check_batch,
            data=data,
        )
        source = common.model_source(
            checkpoint,
            arch,
            num_classes,
            img_size,
            trust_pickle,
            random_init,
            seed_init,
            model_class=model_class,
        )
        with common.status("exporting and checking..."):
            result = run_export(source, config, out, overwrite=overwrite)
        from wasi_tool.artifact.names import REPORT

        common.write_report_json(json_path, result.out, REPORT)
    if not common.is_stdout(json_path):
        render(result, config)


def render(result: ExportResult, config: ExportConfig) -> None:
    table = Table(title=f"{result.loaded.arch}: export checked against torch")
    for col in ("file", "size", "opset", "inputs", "max |onnx - torch|", "top-1 agreement"):
        table.add_column(col, justify="left" if col in ("file", "inputs") else "right")
    for name, entry in result.files.items():
        rows = [r for r in result.checks if r.file == name]
        size = human_bytes(entry["bytes"])
        if not rows:
            table.add_row(name, size, "", "", "", "")
        for i, r in enumerate(rows):
            table.add_row(
                name if i == 0 else "",
                size if i == 0 else "",
                str(config.opset) if i == 0 else "",
                r.inputs,
                f"{r.max_abs_diff:.2e}",
                f"{r.top1_agreement:.3f}",
            )
    console.print(table)
    for name, role in result.roles.items():
        console.print(f"  {name}: {role}")
    console.print(f"wrote {result.out}/")
