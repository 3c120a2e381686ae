"""The export stage: weights to safetensors (factored or merged) and ONNX, checked against torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TypedDict

import numpy as np
import torch
from torch import nn

from wasi_tool import artifact, onnxio
from wasi_tool.artifact import EXPORT, FileEntry, StageRecord
from wasi_tool.config import StageConfig, register_config
from wasi_tool.errors import WasiToolError
from wasi_tool.models.families import family_of
from wasi_tool.models.loading import LoadedModel, ModelSource, load_model
from wasi_tool.stages.common import layer_records, write_stage_artifact
from wasi_tool.transforms.merge import merge_

ONNX_FILE = artifact.ONNX
INT8_FILE = artifact.INT8_ONNX


@register_config
@dataclass
class ExportConfig(StageConfig):
    """What to export and how to check it.

    Args:
        onnx: also write ``model.onnx`` (the safetensors weights are always written).
        merge: write dense ``weight`` tensors (L R) under the original timm names instead of
            factors, loadable by timm without wasi-tool; the ONNX graph is then dense too.
        int8: also write ``model.int8.onnx`` (onnxruntime dynamic quantisation of MatMuls).
        ort_opt: also save onnxruntime's optimised graph at this level (basic|extended|all).
        opset: ONNX opset (>= 17).
        atol: fail when max |onnx - torch| > atol * max(1, max |torch logits|).
        min_agreement: fail an int8 export whose top-1 agreement with torch is lower.
        check_batch: the larger validation batch (batch 1 is always checked).
        data: a dataset (as for finetune) whose first test images are checked too.
        check_images: how many of them.
        seed: seed of the random validation inputs.
    """

    stage: ClassVar[str] = "export"

    onnx: bool = True
    merge: bool = False
    int8: bool = False
    ort_opt: str | None = None
    opset: int = 18
    atol: float = 1e-4
    min_agreement: float = 0.98
    check_batch: int = 7
    data: str | None = None
    check_images: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise WasiToolError(f"opset must be >= 17, got {self.opset}")
        if not self.atol > 0:
            raise WasiToolError(f"atol must be positive, got {self.atol}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise WasiToolError(f"min_agreement must be in [0, 1], got {self.min_agreement}")
        if self.ort_opt is not None and self.ort_opt not in onnxio.ORT_LEVELS:
            raise WasiToolError(
                f"ort_opt must be one of {', '.join(onnxio.ORT_LEVELS)}, got {self.ort_opt!r}"
            )
        if (self.int8 or self.ort_opt) and not self.onnx:
            raise WasiToolError("--int8 and --ort-opt need the ONNX export")
        if self.check_batch < 2 or self.check_images < 1:
            raise WasiToolError("check_batch must be >= 2 and check_images >= 1")


@dataclass
class CheckRow:
    """One exported file checked on one input set."""

    file: str
    inputs: str
    max_abs_diff: float
    logits_scale: float
    top1_agreement: float
    passed: bool


class ExportReport(TypedDict):
    """An export's ``report.json``: the role of each file and every check (``CheckRow``)."""

    stage: str
    outputs: dict[str, str]
    checks: list[dict[str, object]]


@dataclass
class ExportResult:
    loaded: LoadedModel
    out: Path
    checks: list[CheckRow]
    files: dict[str, FileEntry] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)


def _check_inputs(loaded: LoadedModel, config: ExportConfig) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(config.seed)
    if family_of(loaded.model).reads_text:
        from wasi_tool.data.text import check_inputs

        return check_inputs(loaded, config.check_batch, gen, config.data, config.check_images)
    from wasi_tool.data import batch_transform, load_data

    transform = batch_transform(loaded)
    size = transform.size
    family = family_of(loaded.model)
    spec = family.input_spec(loaded.model, loaded.model_kwargs)
    sets = [
        (f"random batch {b}", family.example_input(loaded.model, spec, b, generator=gen))
        for b in (1, config.check_batch)
    ]
    if config.data is not None:
        test = load_data(config.data, size).test
        count = min(config.check_images, len(test))  # type: ignore[arg-type]
        images = torch.stack([test[i][0] for i in range(count)])
        sets.append((f"{count} test images of {config.data}", transform(images)))
    return sets


def _compare(
    file: str, sess: object, model: nn.Module, inputs: list[tuple[str, torch.Tensor]], atol: float
) -> list[CheckRow]:
    rows = []
    for label, x in inputs:
        with torch.no_grad():
            ref = model(x).numpy()
        got = onnxio.run(sess, x.numpy())
        diff = float(np.abs(got - ref).max())
        scale = float(np.abs(ref).max())
        agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
        rows.append(CheckRow(file, label, diff, scale, agree, diff <= atol * max(1.0, scale)))
    return rows


def run_export(
    source: ModelSource, config: ExportConfig, out: Path, *, overwrite: bool = False
) -> ExportResult:
    """Load a model or artifact, write its export directory at ``out`` (atomically), check it.

    The directory is itself an artifact (``model.safetensors`` + manifest carried forward) plus
    the ONNX files; the manifest's ``outputs`` says which file is which.
    """
    out = Path(out)
    artifact.check_output_dir(out, overwrite)
    loaded = load_model(source)
    model = loaded.model.eval()
    merged = merge_(model) if config.merge else 0
    inputs = _check_inputs(loaded, config) if config.onnx else []
    checks: list[CheckRow] = []
    roles = {
        artifact.WEIGHTS: (
            f"dense weights under timm names ({merged} factored layers merged)"
            if config.merge
            else "weights; factored layers as <name>.L, <name>.R, <name>.bias"
        ),
    }

    def write_onnx(staging: Path) -> None:
        if not config.onnx:
            return
        spec = family_of(model).input_spec(model, loaded.model_kwargs)
        path = onnxio.export_onnx(
            model,
            inputs[-1][1][:2],
            staging / ONNX_FILE,
            config.opset,
            spec.onnx_input,
            spec.dynamic_axes,
        )
        onnxio.check_model(path)
        roles[ONNX_FILE] = f"fp32 ONNX, opset {config.opset}, dynamic batch; " + (
            "dense linears" if config.merge else "factored linears as two MatMuls"
        )
        rows = _compare(ONNX_FILE, onnxio.session(path), model, inputs, config.atol)
        checks.extend(rows)
        bad = [r for r in rows if not r.passed]
        if bad:
            worst = max(bad, key=lambda r: r.max_abs_diff)
            raise WasiToolError(
                f"ONNX output differs from torch on {worst.inputs}: max |diff| "
                f"{worst.max_abs_diff:.3g} > atol {config.atol:g} x scale "
                f"{max(1.0, worst.logits_scale):.3g}"
            )
        if config.ort_opt:
            name = f"model.ort-{config.ort_opt}.onnx"
            opt = onnxio.optimize(path, staging / name, config.ort_opt)
            roles[name] = f"onnxruntime-optimised copy of {ONNX_FILE} (level {config.ort_opt})" + (
                "; may hold host-specific layouts: optimise on the target device"
                if config.ort_opt == "all"
                else ""
            )
            checks.extend(_compare(name, onnxio.session(opt), model, inputs, config.atol))
        if config.int8:
            q = onnxio.quantize_int8(path, staging / INT8_FILE)
            roles[INT8_FILE] = "int8 dynamic quantisation of the MatMul weights (onnxruntime)"
            rows = _compare(INT8_FILE, onnxio.session(q), model, inputs, config.atol)
            for r in rows:
                r.passed = r.top1_agreement >= config.min_agreement
            checks.extend(rows)
            low = [r for r in rows if not r.passed]
            if low:
                raise WasiToolError(
                    f"int8 top-1 agreement {min(r.top1_agreement for r in low):.3f} on "
                    f"{low[0].inputs} is below --min-agreement {config.min_agreement}"
                )

    def report() -> ExportReport:
        return {"stage": EXPORT, "outputs": roles, "checks": [dict(vars(r)) for r in checks]}

    files = write_stage_artifact(
        loaded,
        out,
        [StageRecord(EXPORT, config.to_dict())],
        layer_records(model),
        report,
        extra=write_onnx,
        overwrite=overwrite,
        outputs=roles,
    )
    return ExportResult(loaded, out, checks, files, roles)
