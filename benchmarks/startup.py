"""Start-up: wall and CPU time of `wasi-tool --help` and `wasi-tool <command> --help`.

Each is run --repeats times in a fresh interpreter (``python -m wasi_tool ...``, this checkout
first on PYTHONPATH, or --source's); the medians are reported, with the load average before and
after (on a busy machine wall time waits for a core; the CPU time, user + system, is what a quiet
machine would take). Whether torch was imported is read from ``-X importtime``.

    python benchmarks/startup.py --json benchmarks/results/startup.json
    python benchmarks/startup.py --vs /path/to/other/checkout   # a before/after pair, alternated
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["finetune", "--help"], ["--version"])


def _run(args: list[str], source: Path, importtime: bool = False) -> tuple[float, float, str]:
    paths = [str(source), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    flags = ["-X", "importtime"] if importtime else []
    proc = subprocess.run(
        [sys.executable, *flags, "-m", "wasi_tool", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=source,  # -m puts the working directory first on sys.path
        check=False,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{args} failed: {proc.stderr[-2000:]}")
    return wall, cpu, proc.stderr


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def measure(sources: list[Path], repeats: int) -> dict[str, dict[str, Any]]:
    """{source: {command: figures}}; the sources alternate run by run, so load drift hits each
    alike."""
    rows: dict[str, dict[str, Any]] = {str(s): {} for s in sources}
    for args in COMMANDS:
        walls: dict[Path, list[float]] = {s: [] for s in sources}
        cpus: dict[Path, list[float]] = {s: [] for s in sources}
        for s in sources:
            _run(args, s)  # warm the page cache
        for _ in range(repeats):
            for s in sources:
                wall, cpu, _ = _run(args, s)
                walls[s].append(wall)
                cpus[s].append(cpu)
        for s in sources:
            log = _run(args, s, importtime=True)[2]
            imported = {line.split("|")[-1].strip() for line in log.splitlines() if "|" in line}
            rows[str(s)][" ".join(args)] = {
                "wall_s_median": round(statistics.median(walls[s]), 3),
                "cpu_s_median": round(statistics.median(cpus[s]), 3),
                "wall_s": [round(w, 3) for w in walls[s]],
                "cpu_s": [round(c, 3) for c in cpus[s]],
                "imports_torch": "torch" in imported,
            }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO, help="checkout to time")
    parser.add_argument("--vs", type=Path, default=None, help="another checkout, alternated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sources = [args.source, *([args.vs] if args.vs else [])]
    before = loadavg()
    rows = measure(sources, args.repeats)
    after = loadavg()
    for source, commands in rows.items():
        print(source)
        for name, r in commands.items():
            print(
                f"  wasi-tool {name:<16} wall {r['wall_s_median']:.2f} s  "
                f"cpu {r['cpu_s_median']:.2f} s  torch imported: {r['imports_torch']}"
            )
    print(f"load average before {before}, after {after} ({os.cpu_count()} cores)")
    if args.json:
        payload = {
            "benchmark": "startup",
            "repeats": args.repeats,
            "load_average_before": before,
            "load_average_after": after,
            "cores": os.cpu_count(),
            "sources": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
