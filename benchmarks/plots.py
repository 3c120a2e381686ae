"""BENCHMARKS.md's figures from the benchmark JSON files (no measuring here).

    python benchmarks/plots.py   # reads benchmarks/results/{accuracy,e2e_step,inference}.json

- pareto.png: test accuracy vs training memory, one point per method (accuracy.json: measured
  saved bytes + weights + gradients of the small ViT on CIFAR-10 5-9) and, beside it, peak RSS
  vs step time of ViT-B/32 at batch 32 (e2e_step.json).
- pareto_full.png: the whole CIFAR-10 transfer on the second backbone, every method
  (accuracy_full_methods.json): test accuracy (mean over the seeds each ran) vs training memory,
  and vs median step time (single-threaded runs on a shared machine: a guide, not a speed
  result); iso-memory runs (--match-memory) marked.
- latency.png: onnxruntime p50 (with p90 whiskers) of ViT-B/32 per model and batch
  (inference.json).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from wasi_tool.wording import ratio

RESULTS = Path(__file__).resolve().parent / "results"


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both lower x and higher y, sorted by x."""
    front, best = [], float("-inf")
    for x, y in sorted(points):
        if y > best:
            front.append((x, y))
            best = y
    return front


def pareto(out: Path) -> None:
    acc = json.loads((RESULTS / "accuracy.json").read_text())
    e2e = json.loads((RESULTS / "e2e_step.json").read_text())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    by: dict[str, list[dict[str, float]]] = {}
    seed = acc["seeds"][0]  # every method has the first seed; later ones may cover a few
    for r in acc["rows"]:
        if r["seed"] == seed:
            by.setdefault(r["method"], []).append(r)
    points = []
    for name, rs in by.items():
        x = sum(r["training_memory_bytes"] for r in rs) / len(rs) / 1e6
        y = 100 * sum(r["test_accuracy"] for r in rs) / len(rs)
        points.append((x, y))
        ax1.scatter(x, y, s=40)
        ax1.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = _pareto_front(points)
    ax1.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="Pareto front")
    ax1.set_xscale("log")
    ax1.set_xlabel("training memory (MB): measured saved activations + weights + gradients")
    ax1.set_ylabel("test accuracy, CIFAR-10 classes 5-9 (%)")
    ax1.set_title(f"small ViT (32 px), {acc['epochs']} epochs, seed {seed}")
    ax1.legend(loc="lower right", fontsize=8)
    for r in e2e["rows"]:
        ax2.scatter(r["peak_rss_gb"], r["median_step_ms"] / 1e3, s=40)
        ax2.annotate(
            r["method"],
            (r["peak_rss_gb"], r["median_step_ms"] / 1e3),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax2.set_xlabel("peak RSS of the training process (GB)")
    ax2.set_ylabel("median training step (s)")
    ax2.set_title(f"ViT-B/32, 224 px, batch {e2e['batch_size']} (fresh process each)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def pareto_full(out: Path) -> None:
    acc = json.loads((RESULTS / "accuracy_full_methods.json").read_text())
    by: dict[str, list[dict[str, Any]]] = {}
    for r in acc["rows"]:
        by.setdefault(r["method"], []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    points = []
    for name, rs in by.items():
        x = statistics.fmean(r["training_memory_bytes"] for r in rs) / 1e6
        t = statistics.fmean(r["median_step_ms"] for r in rs) / 1e3
        y = 100 * statistics.fmean(r["test_accuracy"] for r in rs)
        points.append((x, y))
        iso = "at wasi's memory" in name
        label = f"{name} ({len(rs)} seed{'s' if len(rs) > 1 else ''})"
        for ax, xv in ((ax1, x), (ax2, t)):
            ax.scatter(xv, y, s=40, marker="s" if iso else "o")
            ax.annotate(label, (xv, y), textcoords="offset points", xytext=(5, 3), fontsize=7)
    front = _pareto_front(points)
    ax1.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="Pareto front")
    ax1.set_xscale("log")
    ax1.set_xlabel("training memory (MB): measured saved activations + weights + gradients")
    ax1.set_ylabel("test accuracy, CIFAR-10 classes 5-9, 5,000 images (%)")
    ax1.set_title("whole CIFAR-10 transfer, second backbone, one epoch", fontsize=10)
    ax1.legend(loc="lower right", fontsize=8)
    ax2.set_xscale("log")
    ax2.set_xlabel("median training step (s), 1 thread, shared machine: a guide")
    ax2.set_title("squares: iso-memory runs (--match-memory)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def latency(out: Path) -> None:
    inf = json.loads((RESULTS / "inference.json").read_text())
    models = list(dict.fromkeys(r["model"] for r in inf["rows"]))
    batches = sorted({r["batch"] for r in inf["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2))
    axes = axes if len(batches) > 1 else [axes]
    for ax, batch in zip(axes, batches, strict=True):
        rows = {r["model"]: r for r in inf["rows"] if r["batch"] == batch}
        p50 = [rows[m]["p50_ms"] for m in models]
        p90 = [rows[m]["p90_ms"] for m in models]
        err = [[0] * len(models), [b - a for a, b in zip(p50, p90, strict=True)]]
        bars = ax.bar(models, p50, yerr=err, capsize=4, color="#4c78a8")
        for bar, m, top in zip(bars, models, p90, strict=True):
            # above the whisker (p90), so the cap does not strike through it
            label = ratio(rows[m]["p50_speedup_vs_dense"], "time") if m != "dense" else "baseline"
            ax.annotate(f"{rows[m]['p50_ms']:.0f} ms\n{label}",
                        (bar.get_x() + bar.get_width() / 2, top),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 3),
                        textcoords="offset points")  # fmt: skip
        ax.set_ylim(0, max(p90) * 1.18)
        ax.set_title(f"ViT-B/32 onnxruntime, batch {batch}, {inf['threads']} threads")
        ax.set_ylabel("p50 latency (ms); whisker to p90")
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    pareto(RESULTS / "pareto.png")
    if (RESULTS / "accuracy_full_methods.json").is_file():
        pareto_full(RESULTS / "pareto_full.png")
    latency(RESULTS / "latency.png")
    print(f"wrote {RESULTS / 'pareto.png'} and {RESULTS / 'latency.png'}")


if __name__ == "__main__":
    main()
