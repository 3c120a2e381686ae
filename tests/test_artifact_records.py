"""The typed artifact (wasi_tool/artifact/records.py): each record reads back what it writes,
a manifest written before the records existed reads the same, a record without a stage kind
still loads, and the pipeline's report reports a stage by the kind it recorded, federate
included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wasi_tool import artifact
from wasi_tool.artifact import (
    FactoredShape,
    LayerRecord,
    Manifest,
    StageRecord,
    WeightsMetadata,
)
from wasi_tool.errors import WasiToolError
from wasi_tool.pipeline.report import stage_kind, write_report

# A manifest as wasi-tool wrote it before artifact/ existed (keys in their written order).
OLD = {
    "format": "wasi-tool-artifact",
    "format_version": 1,
    "created": "2026-01-01T00:00:00+00:00",
    "versions": {"wasi_tool": "0.1.0", "torch": "2.4.0", "timm": "1.0", "python": "3.11.7"},
    "source": {"kind": "random-init", "path": None, "sha256": None, "seed": 0},
    "model": {"arch": "vit_tiny_patch16_224", "kwargs": {"num_classes": 10, "img_size": 32}},
    "stages": [
        {
            "stage": "compress",
            "config": {"rank_ratio": 0.5},
            "calibration": {"data": "digits", "samples": 64},
            "budget": {"fraction": 0.4},
        },
        {"stage": "finetune", "config": {"method": "wasi", "epochs": 1}, "data": "digits"},
    ],
    "layers": [
        {
            "name": "blocks.0.mlp.fc1",
            "out_features": 768,
            "in_features": 192,
            "rank": 32,
            "act_ranks": [16, 5, 24],
            "heldout_error": {"plain": 0.2, "calibrated": 0.1},
        },
        {"name": "head", "out_features": 10, "in_features": 192, "rank": None, "act_ranks": None},
    ],
    "files": {"model.safetensors": {"sha256": "0" * 64, "bytes": 12}},
}


def test_a_manifest_reads_back_as_written() -> None:
    manifest = Manifest.from_dict(OLD)
    assert manifest.kind == "finetune"
    assert [s.kind for s in manifest.stages] == ["compress", "finetune"]
    assert manifest.stages[0].calibration == {"data": "digits", "samples": 64}
    assert manifest.layers[0].act_ranks == (16, 5, 24) and manifest.layers[1].rank is None
    assert manifest.files["model.safetensors"]["bytes"] == 12
    # the same JSON, byte for byte, in the same key order
    assert json.dumps(manifest.to_dict()) == json.dumps(OLD)


def test_a_stage_record_keeps_what_it_does_not_know_and_may_name_no_kind() -> None:
    raw = {"stage": "export", "config": {}, "future_key": [1, 2]}
    assert StageRecord.from_dict(raw).to_dict() == raw
    untyped = StageRecord.from_dict({"config": {"eps": 0.8}})  # written before kinds were sure
    assert untyped.kind is None and untyped.to_dict() == {"config": {"eps": 0.8}}
    assert Manifest.from_dict({**OLD, "stages": [{"config": {}}]}).kind == "artifact"
    with pytest.raises(WasiToolError, match="a stage record's 'stage' must be a str"):
        StageRecord.from_dict({"stage": 3})
    with pytest.raises(WasiToolError, match="a stage record must be an object"):
        Manifest.from_dict({**OLD, "stages": ["compress"]})


def test_source_and_federated_entries_are_checked() -> None:
    with pytest.raises(WasiToolError, match="source must be an object with a kind, path"):
        Manifest.from_dict({**OLD, "source": {"kind": 3}})
    with pytest.raises(WasiToolError, match="federated must be an object with a list of round"):
        Manifest.from_dict({**OLD, "federated": {"history": "all of them"}})
    foreign = Manifest.from_dict({**OLD, "source": {"who": "a test"}})  # open: kept as read
    assert foreign.source == {"who": "a test"}


def test_a_layer_record_is_checked() -> None:
    assert LayerRecord.from_dict(OLD["layers"][1]).to_dict() == OLD["layers"][1]
    with pytest.raises(WasiToolError, match="a layer record needs a name and integer sizes"):
        LayerRecord.from_dict({"name": "x", "out_features": -1, "in_features": 1})


def test_weights_metadata_round_trip_and_errors() -> None:
    meta = WeightsMetadata(
        "vit_tiny_patch16_224",
        {"num_classes": 10},
        {"blocks.0.mlp.fc1": FactoredShape(768, 192, 32, True)},
        {"blocks.3": (0.7, True)},
        [StageRecord("compress", {"rank_ratio": 0.5})],
    )
    strings = meta.to_dict()
    assert strings["format"] == artifact.WEIGHTS_FORMAT and strings["format_version"] == "1"
    assert strings["factored"] == '{"blocks.0.mlp.fc1": [768, 192, 32, true]}'
    assert WeightsMetadata.is_wasi(strings)
    assert WeightsMetadata.from_dict(strings, "w") == meta
    with pytest.raises(WasiToolError, match="w: malformed wasi-tool metadata"):
        WeightsMetadata.from_dict({**strings, "factored": "[1]"}, "w")
    with pytest.raises(WasiToolError, match="w: weights format_version 2 is not supported"):
        WeightsMetadata.from_dict({**strings, "format_version": "2"}, "w")


def _federate_artifact(out: Path) -> Path:
    """An artifact as a federate stage writes it (tiny weights, two rounds)."""
    history = [
        {"round": k, "clients": [{"node": 1, "status": "ok"}, {"node": 2, "status": "ok"}],
         "accepted": 2, "test_loss": 1.0 / k, "test_accuracy": 0.5 + 0.1 * k, "seconds": 1.5}
        for k in (1, 2)
    ]  # fmt: skip
    summary = {"schema": "wasi-tool-federated/1", "clients": 2, "partition": "iid",
               "rounds": 2, "method": "wasi", "history": history}  # fmt: skip
    manifest = Manifest.build(
        {"kind": "random-init", "path": None, "sha256": None},
        "vit_tiny_patch16_224",
        {},
        [StageRecord(artifact.FEDERATE, {"method": "wasi", "clients": 2}, data="digits")],
        [],
        federated=summary,
    )
    weights = WeightsMetadata("vit_tiny_patch16_224", {}, stages=manifest.stages)
    report = {"stage": "federate", "final": {"test_accuracy": 0.7}}
    return artifact.write_artifact(out, {"w": torch.zeros(2)}, weights, manifest, report)


def test_the_report_reads_the_recorded_kind_and_reports_federate(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    fed = _federate_artifact(run / "fed")
    assert stage_kind(fed) == "federate"
    federated = artifact.load_manifest(fed).federated
    assert federated is not None and federated["rounds"] == 2
    # no file of the stage names its kind (no metrics.json, no model.onnx): the record does
    (fed / artifact.ONNX).write_bytes(b"not an export")  # a stray file does not mislead it
    out = tmp_path / "report"
    out.mkdir()
    summary = write_report(run, ["fed"], out, "federated")
    assert summary["federate"]["fed"] == {
        "method": "wasi",
        "clients": 2,
        "partition": "iid",
        "rounds": 2,
        "test_loss": 0.5,
        "test_accuracy": pytest.approx(0.7),
    }
    assert summary["export"] == {}
    text = (out / artifact.REPORT_MD).read_text()
    assert "## Federated training (fed: wasi, 2 clients, partition iid, 2 rounds)" in text
    assert "| 2 | 2 / 2 | 0.5000 | 0.7000 | 1.5 |" in text
    assert json.loads((out / artifact.REPORT).read_text())["federate"]["fed"]["rounds"] == 2


def test_the_manifest_names_the_outputs_an_extra_step_wrote(tmp_path: Path) -> None:
    """An export's file roles are filled while its ONNX files are written (``extra``): the
    manifest is built after that step, so it lists them."""
    from wasi_tool.models.loading import LoadedModel
    from wasi_tool.stages.common import write_stage_artifact

    loaded = LoadedModel(torch.nn.Linear(2, 2), "toy", {}, {"kind": "python", "path": None})
    roles = {artifact.WEIGHTS: "weights"}

    def extra(staging: Path) -> None:
        (staging / artifact.ONNX).write_bytes(b"onnx")
        roles[artifact.ONNX] = "fp32 ONNX"

    out = tmp_path / "e"
    write_stage_artifact(
        loaded, out, [StageRecord(artifact.EXPORT, {})], [], {}, extra=extra, outputs=roles
    )
    manifest = artifact.load_manifest(out)
    assert manifest.outputs == {"model.safetensors": "weights", "model.onnx": "fp32 ONNX"}
    assert manifest.kind == "export" and artifact.ONNX in manifest.files
