"""What every stage does at its end: record itself and write the model as an artifact."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from wasi_tool import artifact
from wasi_tool.artifact import FileEntry, LayerRecord, Manifest, StageRecord
from wasi_tool.artifact.records import FederatedSummary
from wasi_tool.models import hf
from wasi_tool.models.loading import LoadedModel, weights_metadata
from wasi_tool.nn.factored import FactoredLinear


def layer_records(
    model: nn.Module,
    names: Sequence[str] | None = None,
    act_ranks: Mapping[str, Sequence[int]] | None = None,
) -> list[LayerRecord]:
    """The manifest's ``layers`` entry, one shape in every stage: each named layer (default:
    every factored layer) with its weight rank (None when dense) and the activation ranks it
    trained with (None when it saved full activations)."""
    if names is None:
        names = [n for n, m in model.named_modules() if isinstance(m, FactoredLinear)]
    rows = []
    for name in names:
        layer: Any = model.get_submodule(name)
        rank = getattr(layer, "rank", None)
        ranks = (act_ranks or {}).get(name)
        rows.append(
            LayerRecord(
                name,
                int(layer.out_features),
                int(layer.in_features),
                int(rank) if isinstance(layer, FactoredLinear) and rank else None,
                tuple(ranks) if ranks else None,
            )
        )
    return rows


def write_stage_artifact(
    loaded: LoadedModel,
    out: Path,
    stages: Sequence[StageRecord],
    layers: Sequence[LayerRecord],
    report: Any,
    *,
    extra: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    outputs: Mapping[str, str] | None = None,
    federated: FederatedSummary | None = None,
) -> dict[str, FileEntry]:
    """Append ``stages`` to the model's history and write ``loaded.model`` to ``out``.

    The manifest (``Manifest.build``) gets the source, the arch and its arguments, the whole
    stage history, the per-layer records, an export's ``outputs`` and a federated run's
    summary; the weights' metadata the same history. Returns the manifest's file entries
    (sha256 and size of each file).
    """
    loaded.stages = [*loaded.stages, *stages]
    history = loaded.stages

    def manifest() -> Manifest:  # after ``extra``: an export's outputs name the files it wrote
        return Manifest.build(
            loaded.source,
            loaded.arch,
            loaded.model_kwargs,
            history,
            layers,
            outputs=outputs,
            federated=federated,
        )

    meta = weights_metadata(loaded)  # with the same history

    def add_files(staging: Path) -> None:
        hf.copy_tokenizer(loaded.tokenizer_dir, staging)  # a text model travels with its tokenizer
        if extra is not None:
            extra(staging)

    artifact.write_artifact(
        out, loaded.model.state_dict(), meta, manifest, report, extra=add_files, overwrite=overwrite
    )
    return artifact.load_manifest(out).files
