"""Datasets and loaders, all offline."""

from wasi_tool.data.batch import batch_transform
from wasi_tool.data.datasets import BatchTransform, DataSplits, load_data, select_classes

__all__ = ["BatchTransform", "DataSplits", "batch_transform", "load_data", "select_classes"]
