"""ViT-B/32 inference in onnxruntime: dense vs factored vs factored int8 vs BSR, batch 1 and 8.

Four ONNX files are made through wasi-tool's own export path (every one checked against torch
before it lands) from one random-init ViT-B/32 (224 px; latency and size do not depend on the
weight values):

    dense           the model as is
    factored        every linear of the 12 blocks at rank min(O, I)/4 (two MatMuls each)
    factored int8   the factored file, onnxruntime dynamic int8 quantisation of its MatMuls
    bsr             dense weights, BSR token dropping in blocks 3, 6, 9 (keep 0.5, fused):
                    50 -> 26 -> 14 -> 8 tokens (TopK + GatherElements in the graph)

All sessions live in this process with the same thread count; after warm-up, requests cycle
through the models (A B C D A B C D ...) so drifts in machine load hit all of them alike.

    python benchmarks/inference.py --threads 2 --json benchmarks/results/inference.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from wasi_tool.methods.bsr import tokens_per_block
from wasi_tool.models import ModelSource, load_model
from wasi_tool.nn import enable_token_drop_
from wasi_tool.stages import CompressConfig, run_compress
from wasi_tool.stages.common import write_stage_artifact
from wasi_tool.stages.export import ExportConfig, run_export

ARCH = "vit_base_patch32_224"


def _bsr_artifact(out: Path) -> list[int]:
    loaded = load_model(ModelSource(random_init=True, arch=ARCH))
    enable_token_drop_(loaded.model, {f"blocks.{i}": (0.5, True) for i in (3, 6, 9)})
    stage = {"stage": "bsr-token-drop", "config": {"blocks": [3, 6, 9], "keep_rate": 0.5}}
    write_stage_artifact(loaded, out, [stage], [], {"stage": "bsr-token-drop"})
    return tokens_per_block(loaded.model, torch.randn(1, 3, 224, 224))


def _time(
    sessions: dict[str, Any], batch: int, warmup: int, repeats: int
) -> dict[str, list[float]]:
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    for _ in range(warmup):
        for s in sessions.values():
            s.run(None, {s.get_inputs()[0].name: x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {s.get_inputs()[0].name: x})
            times[k].append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = ModelSource(random_init=True, arch=ARCH)
        dense = run_export(src, ExportConfig(), root / "dense").out / "model.onnx"
        comp = run_compress(src, CompressConfig(targets="all", rank_ratio=0.25), root / "comp")
        # random weights give near-uniform logits, so int8's top-1 agreement is not meaningful
        fact = run_export(
            ModelSource(checkpoint=comp.out), ExportConfig(int8=True, min_agreement=0.0), root / "f"
        ).out
        tokens = _bsr_artifact(root / "bsr-art")
        bsr = run_export(ModelSource(checkpoint=root / "bsr-art"), ExportConfig(), root / "bsr")
        paths = {
            "dense": dense,
            "factored": fact / "model.onnx",
            "factored int8": fact / "model.int8.onnx",
            "bsr": bsr.out / "model.onnx",
        }
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        sessions = {k: ort.InferenceSession(str(p), opts) for k, p in paths.items()}
        rows: list[dict[str, Any]] = []
        for batch in args.batches:
            times = _time(sessions, batch, args.warmup, args.repeats)
            base = statistics.median(times["dense"])
            for k, v in times.items():
                p50 = statistics.median(v)
                rows.append(
                    {
                        "model": k,
                        "batch": batch,
                        "file_bytes": paths[k].stat().st_size,
                        "p50_ms": round(p50 * 1e3, 2),
                        "p90_ms": round(float(np.percentile(v, 90)) * 1e3, 2),
                        "p50_speedup_vs_dense": round(base / p50, 3),
                        "size_ratio_vs_dense": round(
                            paths["dense"].stat().st_size / paths[k].stat().st_size, 3
                        ),
                    }
                )
    print("| model | batch | file (MB) | smaller | p50 (ms) | p90 (ms) | faster |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['file_bytes'] / 1e6:.1f} | "
            f"{r['size_ratio_vs_dense']:.2f}x | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
            f"{r['p50_speedup_vs_dense']:.2f}x |"
        )
    fact1 = next(r for r in rows if r["model"] == "factored" and r["batch"] == args.batches[0])
    targets = {
        "p50_speedup": {"goal": 1.7, "value": fact1["p50_speedup_vs_dense"]},
        "file_size_ratio": {"goal": 2.0, "value": fact1["size_ratio_vs_dense"]},
    }
    for key, t in targets.items():
        t["met"] = t["value"] >= t["goal"]
        print(f"target factored {key} >= {t['goal']}x: {t['value']:.2f}x -> "
              f"{'met' if t['met'] else 'missed'}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": "inference",
            "arch": ARCH,
            "threads": args.threads,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "bsr_tokens_per_block": tokens,
            "rows": rows,
            "targets": targets,
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d"),
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
