"""Every method on the built-in digits task, each in a fresh `wasi-tool finetune` process.

A random-init ViT-Tiny at 32 px (12 blocks, width 192; 4 patches + CLS) is trained from the same
seed by each method; targets are the 24 MLP linears. The table gives test accuracy, the median
step time, the bytes autograd saved per step (all layers, and the targeted ones), and the peak
RSS of the process (it includes loading and evaluation). Ratios are against vanilla.

    python benchmarks/finetune_digits.py --epochs 5 --json finetune_digits.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from wasi_tool.wording import ratio

METHODS = ["vanilla", "asi", "wsi", "wasi"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--eps", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            out = Path(tmp) / method
            cmd = [
                "wasi-tool", "finetune", "--random-init", "--arch", "vit_tiny_patch16_224",
                "--img-size", "32", "--data", "digits", "--method", method, "--eps", str(args.eps),
                "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                "--targets", "mlp", "--out", str(out),
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.exit(f"{method}: {proc.stderr.strip()}")
            m = json.loads((out / "metrics.json").read_text())
            saved = m["measured"]["saved_bytes_per_step"]
            rows.append(
                {
                    "method": method,
                    "test_accuracy": m["final"]["test_accuracy"],
                    "median_step_ms": round(m["measured"]["median_step_seconds"] * 1e3, 1),
                    "saved_bytes_total": saved["total"],
                    "saved_bytes_targets": saved["targets"],
                    "peak_rss_mb": round(m["measured"]["peak_rss_bytes"] / 1e6, 1),
                    "act_ranks_block0_fc1": m["act_ranks"].get("blocks.0.mlp.fc1"),
                    "weight_rank_block0_fc1": m["weight_ranks"].get("blocks.0.mlp.fc1"),
                }
            )
    base = rows[0]
    header = ("method", "acc", "step ms", "saved/step", "targets", "RSS MB")
    print("{:8s} {:>6s} {:>8s} {:>11s} {:>9s} {:>7s}".format(*header))
    for r in rows:
        r["targets_saved_ratio_vs_vanilla"] = round(
            base["saved_bytes_targets"] / r["saved_bytes_targets"], 2
        )
        r["step_time_ratio_vs_vanilla"] = round(r["median_step_ms"] / base["median_step_ms"], 3)
        print(
            f"{r['method']:8s} {r['test_accuracy']:6.3f} {r['median_step_ms']:8.1f} "
            f"{r['saved_bytes_total'] / 1e6:9.1f}MB {r['saved_bytes_targets'] / 1e6:7.2f}MB "
            f"{r['peak_rss_mb']:7.0f}  (targets: "
            f"{ratio(r['targets_saved_ratio_vs_vanilla'])} bytes than vanilla)"
        )
    if args.json:
        payload = {
            "benchmark": "finetune_digits",
            "epochs": args.epochs,
            "eps": args.eps,
            "batch_size": args.batch_size,
            "torch": torch.__version__,
            "platform": platform.platform(),
            "rows": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
