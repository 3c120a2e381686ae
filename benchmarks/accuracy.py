"""Accuracy of every method on a real transfer task: CIFAR-10 classes 0-4 -> 5-9.

The source model is a small ViT (32 px, 4-px patches, width 128, 6 blocks) that wasi-tool
pretrains itself on classes 0-4 of ../shared/data/cifar10_subset.npz with
pipelines/cifar5_pretrain.toml (run here first when its artifact is missing). Each method then
fine-tunes it on classes 5-9 (5,000 train images) and is tested on their 1,000 test images,
with the same recipe, epochs and seed; each run is `wasi-tool finetune` in a fresh process, so
its peak RSS is its own. Targets: every linear of the blocks (bsr: those inside its trained
blocks).

    python benchmarks/accuracy.py --epochs 3 --seeds 233 --json benchmarks/results/accuracy.json

Figures per run: test accuracy after the last epoch, median step time, peak RSS, bytes saved for
backward per step (measured), trainable parameters, and "training memory" = measured saved
bytes + weights + one gradient per trainable parameter (fp32), the x axis of the Pareto plot.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10_subset.npz"
RECIPE = ROOT / "pipelines" / "cifar5_pretrain.toml"

# name -> finetune flags (beyond the shared ones)
METHODS: dict[str, list[str]] = {
    "vanilla": ["--method", "vanilla"],
    "wasi eps 0.6": ["--method", "wasi", "--eps", "0.6"],
    "wasi eps 0.8": ["--method", "wasi", "--eps", "0.8"],
    "wasi eps 0.9": ["--method", "wasi", "--eps", "0.9"],
    "wasi eps 0.8, act 0.95": ["--method", "wasi", "--eps", "0.8", "--act-eps", "0.95"],
    "asi": ["--method", "asi", "--act-eps", "0.8"],
    "wsi": ["--method", "wsi", "--eps", "0.8"],
    "bsr": ["--method", "bsr"],
    "bsr+wasi": ["--method", "bsr+wasi", "--eps", "0.8"],
    "lora": ["--method", "lora", "--lora-rank", "8", "--lora-alpha", "16"],
    # lossy storage (off by default): norm and GELU inputs kept in bfloat16 for backward
    "vanilla, lossy bf16": ["--method", "vanilla", "--lossy", "bf16"],
    "wasi eps 0.8, lossy bf16": ["--method", "wasi", "--eps", "0.8", "--lossy", "bf16"],
}


def pretrained(runs: Path) -> Path:
    art = runs / "cifar5" / "pretrain"
    if not (art / "manifest.json").is_file():
        cmd = ["wasi-tool", "run", str(RECIPE), "--out", str(runs / "cifar5")]
        print("pretraining:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return art


def finetune(src: Path, name: str, seed: int, epochs: int, batch: int, out: Path) -> dict[str, Any]:
    cmd = [
        "wasi-tool", "finetune", str(src), "--data", str(DATA), "--classes", "5,6,7,8,9",
        "--targets", "all", "--epochs", str(epochs), "--batch-size", str(batch),
        "--seed", str(seed), "--new-head", "--out", str(out), "--overwrite", *METHODS[name],
    ]  # fmt: skip
    start = time.perf_counter()
    done = out.parent / f"{out.name}.command"
    if done.is_file() and done.read_text() == " ".join(cmd) and (out / "metrics.json").is_file():
        print(f"{name}: reusing {out} (same command)", flush=True)
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed: {proc.stderr.strip().splitlines()[-1:]}")
        done.write_text(" ".join(cmd))
    m = json.loads((out / "metrics.json").read_text())
    layers = m["analytic"]["layers"]
    analytic_targets = 4 * sum(layer["memory_elements"]["activation"] for layer in layers)
    model = m["analytic"]["model"]
    saved = m["measured"]["saved_bytes_per_step"]["total"]
    memory = saved + 4 * (model["parameters"] + model["gradient_elements"])
    return {
        "method": name,
        "seed": seed,
        "test_accuracy": m["final"]["test_accuracy"],
        "accuracy_by_epoch": [e["test_accuracy"] for e in m["epochs"]],
        "median_step_ms": m["measured"]["median_step_seconds"] * 1e3,
        "peak_rss_bytes": m["measured"]["peak_rss_bytes"],
        "saved_bytes_per_step": saved,
        "saved_bytes_targets": m["measured"]["saved_bytes_per_step"]["targets"],
        "analytic_saved_bytes_targets": analytic_targets,
        "analytic_over_measured_targets": analytic_targets
        / max(1, m["measured"]["saved_bytes_per_step"]["targets"]),
        "parameters": model["parameters"],
        "trainable_parameters": model["trainable_parameters"],
        "training_memory_bytes": memory,
        "targets": len(m["targets"]),
        "wall_seconds": round(time.perf_counter() - start, 1),  # ~0 when reused
        "command": " ".join(cmd),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[233])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--later-seeds-only",
        nargs="+",
        default=None,
        choices=list(METHODS),
        help="run the seeds after the first for these methods only (when time is short)",
    )
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"needs {DATA} (the shared CIFAR-10 subset)")
    src = pretrained(args.runs)
    pre = json.loads((src / "metrics.json").read_text())["final"]
    print(f"pretrained on classes 0-4: test accuracy {pre['test_accuracy']:.4f}", flush=True)
    rows = []
    for k, seed in enumerate(args.seeds):
        for name in args.methods:
            if k > 0 and args.later_seeds_only and name not in args.later_seeds_only:
                continue
            out = args.runs / "accuracy" / f"{name.replace(' ', '-')}-s{seed}"
            row = finetune(src, name, seed, args.epochs, args.batch_size, out)
            rows.append(row)
            print(
                f"{name:14s} seed {seed}: acc {row['test_accuracy']:.4f}  "
                f"step {row['median_step_ms']:.0f} ms  "
                f"saved {row['saved_bytes_per_step'] / 1e6:.1f} MB  "
                f"memory {row['training_memory_bytes'] / 1e6:.1f} MB  "
                f"rss {row['peak_rss_bytes'] / 1e9:.2f} GB  ({row['wall_seconds']} s)",
                flush=True,
            )
    by = {}
    for name in args.methods:
        accs = [r["test_accuracy"] for r in rows if r["method"] == name]
        by[name] = sum(accs) / len(accs)
    gap = (
        (by["vanilla"] - by["wasi eps 0.8"]) * 100
        if {"vanilla", "wasi eps 0.8"} <= set(by)
        else None
    )
    if gap is not None:
        verdict = "met" if gap <= 1.0 else "missed"
        print(f"target: wasi eps 0.8 within 1.0 point of vanilla: {gap:+.2f} points -> {verdict}")
    result = {
        "benchmark": "accuracy",
        "task": "CIFAR-10 subset: pretrain classes 0-4, fine-tune + test classes 5-9",
        "pretrained": {"artifact": str(src), "test_accuracy_classes_0_4": pre["test_accuracy"]},
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "mean_accuracy": by,
        "vanilla_minus_wasi_eps0.8_points": gap,
        "rows": rows,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
