"""Time `wasi-tool compress` end to end (a fresh process: imports, load, SVD, write).

Random-init checkpoints of ViT-B/32 (saved as .pth, as a training script would) and Swin-T are
written to a temporary directory; the CLI compresses each with the default targets (MLP fc1/fc2).

    python benchmarks/compress_time.py --json compress_time.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from wasi_tool.models.registry import build_model

CASES = [("vit_base_patch32_224", ".pth"), ("swin_tiny_patch4_window7_224", ".pth")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", type=float, default=0.8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, suffix in CASES:
            torch.manual_seed(0)
            ckpt = Path(tmp) / f"{arch}{suffix}"
            torch.save(build_model(arch).state_dict(), ckpt)
            out = Path(tmp) / f"{arch}-out"
            cmd = ["wasi-tool", "compress", str(ckpt), "--arch", arch, "--eps", str(args.eps)]
            cmd += ["--out", str(out)]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            seconds = time.perf_counter() - start
            if proc.returncode != 0:
                sys.exit(f"{arch}: wasi-tool failed: {proc.stderr.strip()}")
            report = json.loads((out / "report.json").read_text())
            rows.append(
                {
                    "arch": arch,
                    "checkpoint": suffix,
                    "eps": args.eps,
                    "wall_seconds": round(seconds, 2),
                    "compress_seconds": report["seconds"],
                    "layers": report["totals"]["layers"],
                    "factored": report["totals"]["factored"],
                    "model_compression": round(report["totals"]["model_compression"], 3),
                }
            )
            print(
                f"{arch:32s} wall {seconds:6.1f} s  (SVD + swap {report['seconds']:5.1f} s)  "
                f"{rows[-1]['factored']}/{rows[-1]['layers']} factored  "
                f"model {rows[-1]['model_compression']:.2f}x smaller"
            )
    if args.json:
        payload = {
            "benchmark": "compress_time",
            "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
            "torch": torch.__version__,
            "rows": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
