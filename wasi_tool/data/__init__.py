"""Datasets and loaders, all offline."""

from wasi_tool.data.datasets import BatchTransform, DataSplits, load_data, select_classes

__all__ = ["BatchTransform", "DataSplits", "load_data", "select_classes"]
