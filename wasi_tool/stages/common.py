"""What every stage does at its end: record itself and write the model as an artifact."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from wasi_tool import artifacts
from wasi_tool.models import hf
from wasi_tool.models.loading import LoadedModel, weights_metadata
from wasi_tool.nn.factored import FactoredLinear

LAYER_FIELDS = ("name", "out_features", "in_features", "rank", "act_ranks")


def layer_records(
    model: nn.Module,
    names: Sequence[str] | None = None,
    act_ranks: Mapping[str, Sequence[int]] | None = None,
) -> list[dict[str, Any]]:
    """The manifest's ``layers`` entry, one shape in every stage (LAYER_FIELDS): each named
    layer (default: every factored layer) with its weight rank (None when dense) and the
    activation ranks it trained with (None when it saved full activations)."""
    if names is None:
        names = [n for n, m in model.named_modules() if isinstance(m, FactoredLinear)]
    rows = []
    for name in names:
        layer: Any = model.get_submodule(name)
        rank = getattr(layer, "rank", None)
        ranks = (act_ranks or {}).get(name)
        rows.append(
            {
                "name": name,
                "out_features": int(layer.out_features),
                "in_features": int(layer.in_features),
                "rank": int(rank) if isinstance(layer, FactoredLinear) and rank else None,
                "act_ranks": list(ranks) if ranks else None,
            }
        )
    return rows


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
