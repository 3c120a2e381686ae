"""What every stage does at its end: record itself and write the model as an artifact."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from wasi_tool import artifacts
from wasi_tool.models import hf
from wasi_tool.models.loading import LoadedModel, weights_metadata


def write_stage_artifact(
    loaded: LoadedModel,
    out: Path,
    stages: list[dict[str, Any]],
    layers: list[dict[str, Any]],
    report: Any,
    *,
    extra: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    **manifest_extra: Any,
) -> dict[str, Any]:
    """Append ``stages`` to the model's history and write ``loaded.model`` to ``out``.

    The manifest gets the source, the arch and its arguments, the whole stage history, the
    per-layer records and ``manifest_extra``; the safetensors metadata the same history.
    Returns the manifest's file entries (sha256 and size of each file).
    """
    loaded.stages = [*loaded.stages, *stages]
    manifest = {
        "source": loaded.source,
        "model": {"arch": loaded.arch, "kwargs": loaded.model_kwargs},
        "stages": loaded.stages,
        "layers": layers,
        **manifest_extra,
    }
    meta = {**weights_metadata(loaded), "stages": loaded.stages}

    def add_files(staging: Path) -> None:
        hf.copy_tokenizer(loaded.tokenizer_dir, staging)  # a text model travels with its tokenizer
        if extra is not None:
            extra(staging)

    artifacts.write_artifact(
        out, loaded.model.state_dict(), meta, manifest, report, extra=add_files, overwrite=overwrite
    )
    files: dict[str, Any] = artifacts.read_manifest(out)["files"]
    return files
