"""Self-contained onnxruntime latency runner (stdlib + numpy + onnxruntime only).

It is run as a fresh process, on this host or copied to a device over SSH, so the peak RSS it
reports is that of the inference session alone. It prints one JSON object on stdout.

    python3 runner.py MODEL.onnx [--vs OTHER.onnx] --batch 1 --threads 4 --warmup 10 --repeats 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

SCHEMA = "wasi-tool-bench-inference/1"


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default 'linear' method)."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarise(latencies_ms: list[float], batch: int) -> dict[str, float]:
    mean = sum(latencies_ms) / len(latencies_ms)
    p50 = percentile(latencies_ms, 50)
    return {
        "p10_ms": percentile(latencies_ms, 10),
        "p50_ms": p50,
        "p90_ms": percentile(latencies_ms, 90),
        "p95_ms": percentile(latencies_ms, 95),
        "p99_ms": percentile(latencies_ms, 99),
        "mean_ms": mean,
        "min_ms": min(latencies_ms),
        "max_ms": max(latencies_ms),
        "images_per_second": batch * 1000.0 / p50,
    }


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _current_rss_bytes() -> int:
    """Resident set size now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _fresh_growth(path: str, args: argparse.Namespace) -> int:
    """The resident memory ``path``'s session adds when loaded and first run, in a fresh
    process of this script: onnxruntime's one-time set-up falls on whichever session loads
    first, so two sessions measured in one process swap values when the files swap."""
    import subprocess

    argv = [sys.executable, os.path.abspath(__file__), path, "--growth-only"]
    for flag in ("batch", "threads", "execution_mode", "graph_opt", "seq_len"):
        argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=3600)
    try:
        return int(json.loads(proc.stdout.strip().splitlines()[-1])["rss_growth_bytes"])
    except (IndexError, ValueError, KeyError, TypeError):
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise SystemExit(lines[-1] if lines else f"error: cannot measure {path}") from None


def _session(path: str, threads: int, mode: str, opt: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if mode == "parallel" else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    opts.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt]
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _input(sess, batch: int, seq_len: int = 128):
    import numpy as np

    inp = sess.get_inputs()[0]
    dims = list(inp.shape)
    if inp.type == "tensor(int64)" and len(dims) == 2:  # token ids (batch, seq) of a text model
        if isinstance(dims[1], int):
            seq_len = dims[1]
        ids = np.random.default_rng(0).integers(1000, 2000, size=(batch, seq_len), dtype=np.int64)
        return inp.name, ids
    if not dims or any(not isinstance(d, int) for d in dims[1:]):
        raise SystemExit(f"error: input {inp.name} has shape {dims}; only the batch may be dynamic")
    if isinstance(dims[0], int) and dims[0] != batch:
        raise SystemExit(f"error: the model's batch is fixed at {dims[0]}, not {batch}")
    shape = [batch, *dims[1:]]
    return inp.name, np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="onnxruntime latency runner")
    parser.add_argument("model")
    parser.add_argument("--vs", default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument(
        "--execution-mode", default="sequential", choices=["sequential", "parallel"]
    )
    parser.add_argument(
        "--graph-opt", default="all", choices=["disabled", "basic", "extended", "all"]
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens, for text models")
    parser.add_argument("--growth-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        import onnxruntime as ort
    except ImportError:
        raise SystemExit("error: onnxruntime is not installed for this python3") from None

    threads = args.threads or (os.cpu_count() or 1)
    paths = {"a": args.model, **({"b": args.vs} if args.vs else {})}
    sessions, feeds, rss_growth = {}, {}, {}
    for key, path in paths.items():
        if not os.path.isfile(path):
            raise SystemExit(f"error: no such model file: {path}")
        before = _current_rss_bytes()
        try:
            sessions[key] = _session(path, threads, args.execution_mode, args.graph_opt)
        except Exception as exc:
            raise SystemExit(f"error: onnxruntime cannot load {path}: {exc}") from None
        feeds[key] = dict([_input(sessions[key], args.batch, args.seq_len)])
        sessions[key].run(None, feeds[key])
        rss_growth[key] = _current_rss_bytes() - before
    if args.growth_only:
        json.dump({"rss_growth_bytes": rss_growth["a"]}, sys.stdout)
        sys.stdout.write("\n")
        return
    if len(paths) > 1:  # each in a fresh process: the same figure whichever loads first
        rss_growth = {k: _fresh_growth(p, args) for k, p in paths.items()}
    for _ in range(args.warmup):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    latencies: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.repeats):  # A B A B ...: drift on a shared machine hits both alike
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[k])
            latencies[k].append((time.perf_counter() - start) * 1000.0)
    result = {
        "schema": SCHEMA,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "threads": threads,
        "execution_mode": args.execution_mode,
        "graph_opt": args.graph_opt,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "onnxruntime": ort.__version__,
        "machine": {
            "node": platform.node(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "system": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        # The whole runner process (both sessions with --vs); rss_growth_bytes per model is the
        # resident memory its session added when it was loaded and first run (with --vs, each
        # measured alone in a fresh process, so the order of the two files does not matter).
        "peak_rss_bytes": _peak_rss_bytes(),
        "models": {
            k: {
                "path": paths[k],
                "file_bytes": os.path.getsize(paths[k]),
                "rss_growth_bytes": rss_growth[k],
                "latencies_ms": latencies[k],
                **summarise(latencies[k], args.batch),
            }
            for k in sessions
        },
    }
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
