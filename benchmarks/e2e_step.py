"""End-to-end training step of ViT-B/32 (224 px, batch 32) for every method, fresh process each.

A step is forward, backward and update of the whole model (`wasi-tool bench --train`'s worker:
synthetic input, warm-up, then timed steps; median). Weights: random init (timing and memory
do not depend on the values). Weight rank min(O, I)/4 (compress --rank-ratio 0.25), activation
ranks (B/4, N/4, 32). Methods and their models:

    vanilla            dense model, every parameter trains
    wasi (mlp)         fc1/fc2 of the 12 blocks factored; WASI on them (the paper's setting)
    wasi (all)         all 72 block linears factored; WASI on them
    asi                dense model; ASI on all 72 block linears
    wsi                all 72 factored; WSI (full activations)
    bsr                dense; blocks 3, 7, 11 + norm + head train; tokens dropped at 3, 6, 9
    bsr+wasi           all 72 factored; bsr with WASI on the linears of its trained blocks
    lora               dense, frozen; peft LoRA r=8 on all 72 block linears + head

    python benchmarks/e2e_step.py --steps 8 --json benchmarks/results/e2e_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from wasi_tool.bench.train import TrainBenchConfig, run_train_bench
from wasi_tool.models import ModelSource
from wasi_tool.stages import CompressConfig, run_compress

ARCH = "vit_base_patch32_224"
# name -> (model: dense | mlp | all, method, targets)
RUNS: dict[str, tuple[str, str, str]] = {
    "vanilla": ("dense", "vanilla", "all"),
    "wasi (mlp)": ("mlp", "wasi", "mlp"),
    "wasi (all)": ("all", "wasi", "all"),
    "asi": ("dense", "asi", "all"),
    "wsi": ("all", "wsi", "all"),
    "bsr": ("dense", "bsr", "all"),
    "bsr+wasi": ("all", "bsr+wasi", "all"),
    "lora": ("dense", "lora", "all"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = ModelSource(random_init=True, arch=ARCH)
        models = {
            kind: run_compress(
                src, CompressConfig(targets=kind, rank_ratio=0.25), Path(tmp) / kind
            ).out
            for kind in ("mlp", "all")
            if any(RUNS[r][0] == kind for r in args.runs)
        }
        for name in args.runs:
            kind, method, targets = RUNS[name]
            base = {"checkpoint": str(models[kind])} if kind != "dense" else {
                "random_init": True, "arch": ARCH
            }  # fmt: skip
            cfg = TrainBenchConfig(
                **base,
                method=method,
                targets=targets,
                batch_size=args.batch_size,
                steps=args.steps,
                warmup=args.warmup,
            )
            result = run_train_bench(cfg)["methods"][method]
            rows[name] = result
            print(
                f"{name:12s} {result['median_step_seconds'] * 1e3:8.1f} ms  "
                f"peak RSS {result['peak_rss_bytes'] / 1e9:5.2f} GB  "
                f"saved {result['saved_bytes_total'] / 1e6:7.1f} MB "
                f"(targets {result['saved_bytes_targets'] / 1e6:6.1f} MB)",
                flush=True,
            )
    base_row = rows.get("vanilla")
    table = []
    for name, r in rows.items():
        row = {
            "method": name,
            "median_step_ms": r["median_step_seconds"] * 1e3,
            "peak_rss_gb": r["peak_rss_bytes"] / 1e9,
            "saved_mb": r["saved_bytes_total"] / 1e6,
            "saved_targets_mb": r["saved_bytes_targets"] / 1e6,
            "trainable_parameters": r.get("trainable_parameters"),
            "targets": r["targets"],
        }
        if base_row is not None:
            row["speedup_vs_vanilla"] = base_row["median_step_seconds"] / r["median_step_seconds"]
            row["peak_rss_ratio_vs_vanilla"] = base_row["peak_rss_bytes"] / r["peak_rss_bytes"]
            row["saved_ratio_vs_vanilla"] = base_row["saved_bytes_total"] / r["saved_bytes_total"]
        table.append(row)
    print("\n| method | step (ms) | vs vanilla | peak RSS (GB) | vs vanilla | saved/step (MB) "
          "| vs vanilla | in targets (MB) |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in table:
        print(
            f"| {row['method']} | {row['median_step_ms']:.0f} | "
            f"{row.get('speedup_vs_vanilla', float('nan')):.2f}x | {row['peak_rss_gb']:.2f} | "
            f"{row.get('peak_rss_ratio_vs_vanilla', float('nan')):.2f}x | {row['saved_mb']:.1f} | "
            f"{row.get('saved_ratio_vs_vanilla', float('nan')):.1f}x | "
            f"{row['saved_targets_mb']:.1f} |"
        )
    targets: dict[str, Any] = {}
    wasi = next((r for r in table if r["method"] == "wasi (all)"), None)
    if wasi and base_row is not None:
        for key, goal, label in (
            ("speedup_vs_vanilla", 1.5, "faster"),
            ("peak_rss_ratio_vs_vanilla", 2.0, "lower peak RSS"),
        ):
            met = wasi[key] >= goal
            targets[key] = {"goal": goal, "value": wasi[key], "met": met}
            print(f"target wasi (all) >= {goal}x {label}: {wasi[key]:.2f}x -> "
                  f"{'met' if met else 'missed'}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": "e2e_step",
            "arch": ARCH,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "weight_rank": "min(O, I) / 4",
            "act_ranks": "(B/4, N/4, 32)",
            "rows": table,
            "raw": rows,
            "targets": targets,
            "machine": {
                "platform": platform.platform(),
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
            "date": time.strftime("%Y-%m-%d"),
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
