"""wasi-tool: fine-tune pretrained transformers on edge CPUs with a fraction of the memory."""

from wasi_tool._version import __version__
from wasi_tool.errors import WasiToolError
from wasi_tool.models import ModelSource, load_model
from wasi_tool.nn import FactoredLinear
from wasi_tool.stages import CompressConfig, CompressReport, compress_, run_compress

__all__ = [
    "CompressConfig",
    "CompressReport",
    "FactoredLinear",
    "ModelSource",
    "WasiToolError",
    "__version__",
    "compress_",
    "load_model",
    "run_compress",
]
