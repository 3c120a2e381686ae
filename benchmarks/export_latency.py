"""Dense vs factored ViT-B/32 in onnxruntime: file sizes and batch-1 latency, one run.

A random-init ViT-B/32 is exported twice through `wasi-tool export`'s library path: dense, and
with every linear of the 12 blocks factored at rank min(O, I)/4 (the head stays dense). Both
sessions run in this process with the same thread count; requests alternate A B A B after
warm-up and the medians are compared.

    python benchmarks/export_latency.py --json export_latency.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from wasi_tool.models import ModelSource
from wasi_tool.stages import CompressConfig, run_compress
from wasi_tool.stages.export import ExportConfig, run_export

ARCH = "vit_base_patch32_224"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = ModelSource(random_init=True, arch=ARCH)
        dense = run_export(src, ExportConfig(), root / "dense")
        comp = run_compress(src, CompressConfig(targets="all", rank_ratio=0.25), root / "comp")
        fact = run_export(ModelSource(checkpoint=comp.out), ExportConfig(), root / "fact")
        paths = {"dense": dense.out / "model.onnx", "factored": fact.out / "model.onnx"}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        sessions = {k: ort.InferenceSession(str(p), opts) for k, p in paths.items()}
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
        for _ in range(args.warmup):
            for s in sessions.values():
                s.run(None, {"pixel_values": x})
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(args.repeats):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {"pixel_values": x})
                times[k].append(time.perf_counter() - t)
        rows = {
            k: {
                "file_bytes": paths[k].stat().st_size,
                "p50_ms": round(statistics.median(v) * 1e3, 2),
                "p90_ms": round(float(np.percentile(v, 90)) * 1e3, 2),
            }
            for k, v in times.items()
        }
        params = comp.report.totals()
    speedup = rows["dense"]["p50_ms"] / rows["factored"]["p50_ms"]
    size_ratio = rows["dense"]["file_bytes"] / rows["factored"]["file_bytes"]
    for k, r in rows.items():
        size_mb = r["file_bytes"] / 1e6
        print(f"{k:9s} {size_mb:7.1f} MB  p50 {r['p50_ms']:7.2f} ms  p90 {r['p90_ms']:7.2f} ms")
    print(f"factored: {size_ratio:.2f}x smaller file, {speedup:.2f}x faster at batch 1", end=" ")
    print(f"({args.threads} threads)")
    if args.json:
        payload = {
            "benchmark": "export_latency",
            "arch": ARCH,
            "rank": "min(O, I)/4, all 72 block linears",
            "threads": args.threads,
            "repeats": args.repeats,
            "rows": rows,
            "p50_speedup": round(speedup, 3),
            "file_size_ratio": round(size_ratio, 3),
            "model_params_before": params["model_params_before"],
            "model_params_after": params["model_params_after"],
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "platform": platform.platform(),
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
