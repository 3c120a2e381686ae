"""Whole-model transforms, torchao-style: a config plus one in-place function each."""

from wasi_tool.transforms.compress import CompressConfig, CompressReport, LayerReport, compress_
from wasi_tool.transforms.merge import merge_

__all__ = ["CompressConfig", "CompressReport", "LayerReport", "compress_", "merge_"]
