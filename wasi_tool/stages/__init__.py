"""Stages: I/O and orchestration over the library (one config and one run function each)."""

from wasi_tool.stages.compress import (
    CompressConfig,
    CompressReport,
    CompressResult,
    compress_,
    run_compress,
)
from wasi_tool.stages.export import ExportConfig, ExportResult, run_export
from wasi_tool.stages.finetune import FinetuneConfig, FinetuneResult, run_finetune

__all__ = [
    "CompressConfig",
    "CompressReport",
    "CompressResult",
    "ExportConfig",
    "ExportResult",
    "FinetuneConfig",
    "FinetuneResult",
    "compress_",
    "run_compress",
    "run_export",
    "run_finetune",
]
