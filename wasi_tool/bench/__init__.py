"""Benchmarks a user runs: onnxruntime latency (device profiles, SSH) and training steps."""

from wasi_tool.bench.inference import InferenceBenchConfig, run_inference_bench
from wasi_tool.bench.profiles import PROFILES, DeviceProfile, get_profile
from wasi_tool.bench.ssh import SSHTarget
from wasi_tool.bench.train import TrainBenchConfig, run_train_bench

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
