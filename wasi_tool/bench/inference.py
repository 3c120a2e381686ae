"""Inference latency: the runner in a fresh process, on this host or on a device over SSH."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wasi_tool.bench import runner
from wasi_tool.bench.profiles import DeviceProfile
from wasi_tool.bench.ssh import SSHTarget
from wasi_tool.errors import WasiToolError


@dataclass(frozen=True)
class InferenceBenchConfig:
    batch_size: int = 1
    warmup: int = 10
    repeats: int = 50
    seq_len: int = 128  # tokens per input of a text model (ignored for images)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.warmup < 0 or self.repeats < 1 or self.seq_len < 2:
            raise WasiToolError("batch size and repeats must be >= 1, warm-up >= 0, seq len >= 2")


def _check_model(path: Path) -> None:
    if not path.is_file():
        raise WasiToolError(f"no such ONNX file: {path}")
    import onnx

    try:
        onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise WasiToolError(f"{path} is not a readable ONNX model: {type(exc).__name__}") from None


def _runner_args(
    models: list[str], profile: DeviceProfile, config: InferenceBenchConfig, local: bool
) -> list[str]:
    threads = profile.resolved_threads() if local else (profile.threads or 0)
    args = [models[0]]
    if len(models) > 1:
        args += ["--vs", models[1]]
    return [
        *args,
        "--batch", str(config.batch_size),
        "--threads", str(threads),
        "--execution-mode", profile.execution_mode,
        "--graph-opt", profile.graph_opt,
        "--warmup", str(config.warmup),
        "--repeats", str(config.repeats),
        "--seq-len", str(config.seq_len),
    ]  # fmt: skip


def _parse(stdout: str, stderr: str, where: str) -> dict[str, Any]:
    try:
        result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else "no output"
        if "No module named" in last and "onnxruntime" in last:
            last = "onnxruntime is not installed for that python there"
        raise WasiToolError(
            f"the benchmark failed {where}: {last.removeprefix('error: ')}"
        ) from None
    if result.get("schema") != runner.SCHEMA:
        raise WasiToolError(f"unexpected benchmark output {where}")
    return result


def run_inference_bench(
    model: Path,
    vs: Path | None,
    profile: DeviceProfile,
    config: InferenceBenchConfig,
    ssh: SSHTarget | None = None,
) -> dict[str, Any]:
    """Latency of ``model`` (and ``vs``, alternating) with ``profile``'s session settings.

    Locally the runner is a fresh subprocess of this Python; with ``ssh`` the models and the
    runner are copied to a temporary directory on the device, run with its ``python3``, and the
    directory is removed. The result says where it ran (``ran_on``).
    """
    paths = [Path(model), *([Path(vs)] if vs is not None else [])]
    for p in paths:
        _check_model(p)
    if ssh is None:
        argv = [
            sys.executable,
            runner.__file__,
            *_runner_args([str(p) for p in paths], profile, config, True),
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=3600)
        result = _parse(proc.stdout, proc.stderr, "on this host")
        result["ran_on"] = {
            "where": "host",
            "note": f"this host with the {profile.name} profile's settings, not a {profile.name}"
            if profile.name != "host"
            else "this host",
        }
    else:
        made = ssh.ssh(["mktemp", "-d"], "mktemp")
        remote_dir = made.stdout.strip()
        if made.returncode != 0 or not remote_dir.startswith("/"):
            raise WasiToolError(f"cannot make a temporary directory on {ssh.destination}")
        try:
            with tempfile.TemporaryDirectory() as tmp:
                staged = []
                for i, p in enumerate(paths):  # fixed names: nothing from the user reaches a path
                    dst = Path(tmp) / f"model{i}.onnx"
                    shutil.copyfile(p, dst)
                    staged.append(dst)
                script = Path(tmp) / "wasi_bench_runner.py"
                shutil.copyfile(runner.__file__, script)
                ssh.copy([*staged, script], remote_dir)
            remote_models = [f"{remote_dir}/{s.name}" for s in staged]
            args = _runner_args(remote_models, profile, config, False)
            proc = ssh.ssh([ssh.python, f"{remote_dir}/wasi_bench_runner.py", *args], "benchmark")
            result = _parse(proc.stdout, proc.stderr, f"on {ssh.destination}")
        finally:
            ssh.ssh(["rm", "-rf", "--", remote_dir], "clean-up")
        result["ran_on"] = {
            "where": "ssh",
            "destination": ssh.destination,
            "note": f"{ssh.destination} over SSH with the {profile.name} profile",
        }
    for key, p in zip(("a", "b"), paths, strict=False):
        result["models"][key]["path"] = str(p)
    result["profile"] = {
        "name": profile.name,
        "description": profile.description,
        "threads": profile.threads,
        "execution_mode": profile.execution_mode,
        "graph_opt": profile.graph_opt,
    }
    cpus = result["machine"].get("cpus")
    if cpus and result["threads"] > cpus:  # e.g. the pi5 profile's 4 threads on a 2-core host
        result["warnings"] = [
            f"the {profile.name} profile runs {result['threads']} threads on a machine with "
            f"{cpus} cores: threads share cores, so latencies are slower than with {cpus} "
            "threads and are not the device's"
        ]
    if vs is not None:
        a, b = result["models"]["a"], result["models"]["b"]
        result["ratios"] = {
            "p50_speedup_vs": b["p50_ms"] / a["p50_ms"],
            "file_size_ratio_vs": b["file_bytes"] / a["file_bytes"],
        }
    return result
