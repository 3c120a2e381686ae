"""Stages: one config dataclass and one function each."""

from wasi_tool.stages.compress import (
    CompressConfig,
    CompressReport,
    CompressResult,
    compress_,
    run_compress,
)
from wasi_tool.stages.finetune import FinetuneConfig, FinetuneResult, run_finetune

__all__ = [
    "CompressConfig",
    "CompressReport",
    "CompressResult",
    "FinetuneConfig",
    "FinetuneResult",
    "compress_",
    "run_compress",
    "run_finetune",
]
