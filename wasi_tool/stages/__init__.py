"""Stages: one config dataclass and one function each."""

from wasi_tool.stages.compress import (
    CompressConfig,
    CompressReport,
    CompressResult,
    compress_,
    run_compress,
)

__all__ = ["CompressConfig", "CompressReport", "CompressResult", "compress_", "run_compress"]
