"""--memory-budget on ViT-B/32 (224 px, batch 32, WASI on all 72 block linears, rank 1/4).

For each budget, a fresh worker process (``bench --train --memory-budget``'s) loads the model,
plans (probe steps at batch 1 and 2, extrapolated to 32), picks the least recompute that fits,
runs the timed steps, and reports the measured peak RSS of its own process (VmHWM) beside the
prediction; or refuses, naming the least it could reach.

    python benchmarks/memory_budget.py --json benchmarks/results/memory_budget.json

The peak is also read from outside the worker where GNU time is installed: the same worker
command, environment and allocator as ``bench --train`` starts, under ``/usr/bin/time -f %M``
(the worker's ``ru_maxrss``; time's own resident size, not this script's, is what a fork
carries into it). "within budget" then reads that figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from wasi_tool.allocator import worker_env
from wasi_tool.bench.train import StepMeasurement, TrainBenchConfig, run_train_bench
from wasi_tool.errors import WasiToolError
from wasi_tool.models import ModelSource
from wasi_tool.stages import CompressConfig, run_compress

ARCH = "vit_base_patch32_224"
GNU_TIME = Path("/usr/bin/time")
WORKER = "wasi_tool.bench.train_worker"


def run_outside(cfg: TrainBenchConfig) -> tuple[StepMeasurement, int]:
    """The bench's worker for ``cfg`` under GNU time: its measurement and its peak resident
    size read from outside (bytes)."""
    env, _ = worker_env(cfg.allocator)
    payload = json.dumps({**cfg.to_dict(), "method": cfg.method})
    proc = subprocess.run(
        [*(str(GNU_TIME), "-f", "maxrss_kib %M"), sys.executable, "-m", WORKER, payload],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env},
    )
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    if proc.returncode != 0:
        line = next((ln for ln in reversed(err) if ln.startswith("error: ")), err[-2:])
        raise WasiToolError(str(line).removeprefix("error: "))
    kib = next(int(ln.split()[1]) for ln in reversed(err) if ln.startswith("maxrss_kib "))
    return StepMeasurement(**json.loads(proc.stdout.strip().splitlines()[-1])), kib * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", default=["1.5GB", "1.2GB", "1.0GB"])
    parser.add_argument("--method", default="wasi")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        src = ModelSource(random_init=True, arch=ARCH)
        model = run_compress(src, CompressConfig(targets="all", rank_ratio=0.25), Path(tmp) / "m")
        for budget in args.budgets:
            cfg = TrainBenchConfig(
                checkpoint=str(model.out),
                method=args.method,
                targets="all",
                batch_size=args.batch_size,
                steps=args.steps,
                warmup=1,
                memory_budget=budget,
            )
            outside = None
            try:
                if GNU_TIME.is_file():
                    m, outside = run_outside(cfg)
                else:
                    m = run_train_bench(cfg).methods[args.method]
            except WasiToolError as exc:
                rows.append({"budget": budget, "refused": str(exc)})
                print(f"{budget}: refused: {exc}", flush=True)
                continue
            plan = m.memory_plan or {}
            row = {
                "budget": budget,
                "budget_bytes": plan.get("budget_bytes"),
                "memory_mode": m.memory_mode,
                "predicted_peak_bytes": plan.get("predicted_peak_bytes"),
                "measured_peak_bytes": m.peak_rss_bytes,
                "measured_peak_outside_bytes": outside,
                "measured_over_predicted": m.peak_rss_bytes / plan["predicted_peak_bytes"],
                "within_budget": max(m.peak_rss_bytes, outside or 0) <= plan["budget_bytes"],
                "allocator": m.allocator,
                "floor_at_load_bytes": m.floor_rss_bytes,
                "median_step_seconds": m.median_step_seconds,
                "parts": plan.get("chosen"),
            }
            rows.append(row)
            predicted = plan["predicted_peak_bytes"] / 1e9
            print(
                f"{budget}: mode {m.memory_mode}, predicted {predicted:.3f} GB, measured "
                f"{m.peak_rss_bytes / 1e9:.3f} GB ({row['measured_over_predicted']:.3f}x), "
                f"from outside {(outside or 0) / 1e9:.3f} GB, "
                f"within budget: {row['within_budget']}",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": "memory_budget",
            "arch": ARCH,
            "method": args.method,
            "batch_size": args.batch_size,
            "weight_rank": "min(O, I) / 4",
            "act_ranks": "(B/4, N/4, 32)",
            "rows": rows,
            "machine": {
                "platform": platform.platform(),
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
            "load_average_at_end": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d"),
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
