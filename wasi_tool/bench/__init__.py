"""Benchmarks a user runs: onnxruntime latency (device profiles, SSH) and training steps.

The names below load lazily (PEP 562): the training bench's worker process
(``python -m wasi_tool.bench.train_worker``) imports this package first, and its peak RSS is
what the bench reports, so it must not pay for the inference side (or the other way round).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "InferenceBenchConfig": "wasi_tool.bench.inference",
    "run_inference_bench": "wasi_tool.bench.inference",
    "PROFILES": "wasi_tool.bench.profiles",
    "DeviceProfile": "wasi_tool.bench.profiles",
    "get_profile": "wasi_tool.bench.profiles",
    "SSHTarget": "wasi_tool.bench.ssh",
    "TrainBenchConfig": "wasi_tool.bench.train",
    "run_train_bench": "wasi_tool.bench.train",
}

if TYPE_CHECKING:
    from wasi_tool.bench.inference import InferenceBenchConfig, run_inference_bench
    from wasi_tool.bench.profiles import PROFILES, DeviceProfile, get_profile
    from wasi_tool.bench.ssh import SSHTarget
    from wasi_tool.bench.train import TrainBenchConfig, run_train_bench


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wasi_tool.bench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "PROFILES",
    "DeviceProfile",
    "InferenceBenchConfig",
    "SSHTarget",
    "TrainBenchConfig",
    "get_profile",
    "run_inference_bench",
    "run_train_bench",
]
