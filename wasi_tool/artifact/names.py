"""The names of the files a stage writes and of the formats they are in: spelled once here.

An artifact directory holds ``WEIGHTS`` (safetensors, whose ``__metadata__`` is a
``WeightsMetadata``), ``MANIFEST`` (a ``Manifest``: how it was made, every file's sha256) and
``REPORT`` (what the stage found), plus what its stage adds: ``METRICS`` (finetune), ``ONNX``
and ``INT8_ONNX`` (export), ``FEDERATED`` (federate), ``ENERGY_PLOT`` (compress --plot). The
other stages of a pipeline run write ``BENCH`` or ``REPORT_MD`` (with a ``REPORT``).
"""

from __future__ import annotations

ARTIFACT_FORMAT = "wasi-tool-artifact"  # manifest.json "format"
WEIGHTS_FORMAT = "wasi-tool-weights"  # model.safetensors __metadata__ "format"
FORMAT_VERSION = 1  # of both

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
REPORT = "report.json"
METRICS = "metrics.json"  # a finetune artifact's FinetuneMetrics
ONNX = "model.onnx"
INT8_ONNX = "model.int8.onnx"
FEDERATED = "federated.json"  # a federate artifact's round history
ENERGY_PLOT = "energy.png"  # compress --plot
BENCH = "bench.json"  # a pipeline's bench stage
REPORT_MD = "report.md"  # a pipeline's report stage
PIPELINE = "pipeline.json"  # a pipeline run's record of its stages

__all__ = [
    "ARTIFACT_FORMAT",
    "BENCH",
    "ENERGY_PLOT",
    "FEDERATED",
    "FORMAT_VERSION",
    "INT8_ONNX",
    "MANIFEST",
    "METRICS",
    "ONNX",
    "PIPELINE",
    "REPORT",
    "REPORT_MD",
    "WEIGHTS",
    "WEIGHTS_FORMAT",
]
