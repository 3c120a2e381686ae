"""What a device is and whether its Python packages run on it (stdlib only).

This is the data-gathering half of ``wasi-tool doctor``; ``wasi_tool.doctor`` judges what it
finds. It imports nothing from wasi_tool, so it can be copied to a device over SSH and run
with the device's own ``python3`` before wasi-tool is installed there, as the latency runner is
(``wasi_tool/bench/runner.py``). It prints one JSON object on stdout:

    python3 device.py [--no-checks] [--timeout 900] [--lib jemalloc=/usr/lib/.../libjemalloc.so.2]

Each package check imports the package and runs a tiny operation in a fresh subprocess, so a
wheel built for a newer CPU (an illegal instruction, SIGILL) kills that subprocess, not this one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import struct
import subprocess
import sys
from typing import TypedDict

SCHEMA = "wasi-tool-device/1"


class CheckResult(TypedDict, total=False):
    """One package check (``run_check``): ``ok``, the ``stage`` it reached, ``signal`` when a
    signal killed it, ``returncode``, ``timeout`` (seconds, when it ran out), the last error
    line and, when it passed, what the check printed (``info``)."""

    ok: bool
    stage: str | None
    signal: str | None
    returncode: int | None
    timeout: float
    error: str
    info: dict[str, object]  # what the check printed (e.g. torch's version and CUDA)


class Probe(TypedDict, total=False):
    """What ``probe`` reads off a machine (the JSON object this script prints)."""

    schema: str
    machine: str
    cpuinfo: str
    cpus_online: str | None
    cpus_possible: str | None
    cpu_count: int | None
    cpu_affinity: int | None
    memory: dict[str, int]
    os: str | None
    kernel: str
    python: str
    python_bits: int
    executable: str
    packages: dict[str, str | None]
    checks: dict[str, CheckResult]
    allocator_libraries: dict[str, str | None]
    ld_preload: str | None


PACKAGES = ("torch", "torchvision", "onnxruntime", "numpy")

# Each check prints "stage <name>" before a step and one JSON line at the end, so the stage a
# crash happened at is known. torch.jit.script: torch 2.6.0 died there on ARMv8.0.
_CHECKS = {
    "torch": """
import json, sys
print("stage import", flush=True)
import torch
print("stage matmul", flush=True)
a = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64) / 4096
s = float((a @ a).sum())
print("stage conv", flush=True)
c = torch.nn.functional.conv2d(torch.ones(1, 3, 8, 8), torch.ones(4, 3, 3, 3))
print("stage autograd", flush=True)
w = torch.ones(8, 8, requires_grad=True)
(torch.tanh(torch.ones(2, 8) @ w)).sum().backward()
print("stage jit", flush=True)
def f(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1
try:
    torch.jit.script(f)(torch.ones(2))
except Exception:  # removed or deprecated in a newer torch: not a CPU fault
    pass
print(json.dumps({"version": torch.__version__, "cuda": torch.version.cuda,
                  "threads": torch.get_num_threads(), "sum": s}))
""",
    "torchvision": """
import json
print("stage import", flush=True)
import torch, torchvision
print("stage nms", flush=True)
boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
print(json.dumps({"version": torchvision.__version__}))
""",
    "onnxruntime": """
import json
print("stage import", flush=True)
import onnxruntime as ort
info = {"version": ort.__version__, "providers": ort.get_available_providers()}
try:
    import numpy as np
    from onnx import TensorProto, helper
except ImportError:
    pass
else:
    print("stage session", flush=True)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.25] * 16)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    print("stage run", flush=True)
    session.run(None, {"x": np.ones((2, 4), dtype=np.float32)})
print(json.dumps(info))
""",
    "numpy": """
import json
print("stage import", flush=True)
import numpy as np
print("stage matmul", flush=True)
a = np.ones((16, 16), dtype=np.float32)
s = float((a @ a).sum())
print(json.dumps({"version": np.__version__, "sum": s}))
""",
}


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def meminfo() -> dict[str, int]:
    """/proc/meminfo's totals in bytes (MemTotal, MemAvailable, SwapTotal, SwapFree, ...)."""
    out: dict[str, int] = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if key in ("MemTotal", "MemFree", "MemAvailable", "SwapTotal", "SwapFree") and parts:
            with contextlib.suppress(ValueError):
                out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def os_release() -> str | None:
    for line in (_read("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return None


def installed_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Versions from the packages' metadata, without importing them (an import may crash)."""
    from importlib import metadata  # 13 ms: not at import (the CLI's --help loads this module)

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _no_core_dump() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_check(name: str, timeout: float = 900.0, python: str | None = None) -> CheckResult:
    """Import package ``name`` and run a tiny operation in a fresh process.

    Returns ``ok``, the ``stage`` it reached, ``signal`` (e.g. "SIGILL") when a signal killed
    it, ``returncode``, the last line of its error output (``error``), and what it printed.
    """
    argv = [python or sys.executable, "-c", _CHECKS[name]]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
            preexec_fn=_no_core_dump,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "stage": None, "signal": None, "returncode": None, "timeout": timeout}
    stages = [ln[6:] for ln in proc.stdout.splitlines() if ln.startswith("stage ")]
    result: CheckResult = {
        "ok": proc.returncode == 0,
        "stage": stages[-1] if stages else None,
        "returncode": proc.returncode,
        "signal": None,
    }
    if proc.returncode < 0:
        try:
            result["signal"] = signal.Signals(-proc.returncode).name
        except ValueError:
            result["signal"] = f"signal {-proc.returncode}"
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if errors and not result["ok"]:
        result["error"] = errors[-1][-300:]
    if result["ok"]:
        try:
            result["info"] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            result["info"] = {}
    return result


def probe(
    checks: bool = True,
    timeout: float = 900.0,
    libraries: dict[str, list[str]] | None = None,
    packages: tuple[str, ...] = PACKAGES,
) -> Probe:
    """Everything doctor judges, read off this machine.

    Args:
        checks: import each installed package and run a tiny operation in a subprocess.
        timeout: seconds per check (an emulated CPU imports torch in about 30 s).
        libraries: allocator name -> candidate paths of its shared library.
        packages: the packages to look at (of ``PACKAGES``).
    """
    versions = installed_versions(packages)
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "schema": SCHEMA,
        "machine": platform.machine(),
        "cpuinfo": _read("/proc/cpuinfo") or "",
        "cpus_online": (_read("/sys/devices/system/cpu/online") or "").strip() or None,
        "cpus_possible": (_read("/sys/devices/system/cpu/possible") or "").strip() or None,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "memory": meminfo(),
        "os": os_release(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_bits": struct.calcsize("P") * 8,
        "executable": sys.executable,
        "packages": versions,
        "checks": {
            name: run_check(name, timeout)
            for name in packages
            if checks and versions.get(name) is not None
        },
        "allocator_libraries": {
            name: next((p for p in paths if os.path.isfile(p)), None)
            for name, paths in (libraries or {}).items()
        },
        "ld_preload": os.environ.get("LD_PRELOAD") or None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-checks", action="store_true", help="no import checks")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per check")
    parser.add_argument("--lib", action="append", default=[], help="NAME=PATH of an allocator")
    parser.add_argument("--packages", default=",".join(PACKAGES), help="comma-separated")
    args = parser.parse_args(argv)
    packages = tuple(p for p in args.packages.split(",") if p in PACKAGES)
    libraries: dict[str, list[str]] = {}
    for item in args.lib:
        name, _, path = item.partition("=")
        libraries.setdefault(name, []).append(path)
    print(json.dumps(probe(not args.no_checks, args.timeout, libraries, packages)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
