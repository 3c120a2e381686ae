"""A busy CPU: WASI vs vanilla steps quiet and beside N busy processes, per OpenMP wait policy.

torch's OpenMP threads spin-wait between parallel regions (OMP_WAIT_POLICY unset: the runtime's
default, active for a while). Beside other busy processes a spinning thread holds a core another
thread needs, and WASI's many small kernels (one parallel region each) pay that most. This
measures, for every setting:

    layers   one WASI linear vs nn.Linear + SGD, a whole step (benchmarks/layer_step.py's), at
             ViT-B/32's fc1/fc2 (B=64, N=50; 768<->3072) and the demo's toy size (ViT-Tiny at
             64 px: B=64, N=17; 192<->768); rank min(O, I)/4, activation ranks (B/4, N/4, 32)
    step     a whole training step of the demo's small ViT (vit_tiny_patch16_224, 64 px,
             batch 64, random init), wasi (mlp, factored at eps 0.8, calibrated activation ranks)
             vs vanilla, through wasi_tool.training.loop.train_step

Settings: OMP_WAIT_POLICY unset vs PASSIVE (``--policies``: also ACTIVE, or spinN: the policy
unset with GNU OpenMP's GOMP_SPINCOUNT=N, idle threads spinning N times before they sleep),
0 / 1 / 2 busy background processes (each a pure
Python spin loop that stops itself after --busy-seconds; started before and killed after the
measurement by this script), and, under load, torch threads = all cores vs cores - 1. Each
setting runs in a fresh subprocess (the wait policy is read when torch starts its OpenMP pool),
settings alternate round by round (rotated order), each measurement is warm-up then alternating
repeats (median); across rounds the median of the per-round medians. Reported: each method's
slowdown against its own quiet run (same policy, all threads), and the WASI speedup per setting.

    python benchmarks/contention.py --json benchmarks/results/contention.json
    python benchmarks/contention.py --rounds 1 --quick     # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("unset", "PASSIVE", "ACTIVE")
LAYERS = {  # name -> (B, N, in, out)
    "vit-b32 fc1": (64, 50, 768, 3072),
    "vit-b32 fc2": (64, 50, 3072, 768),
    "toy fc1": (64, 17, 192, 768),
    "toy fc2": (64, 17, 768, 192),
}
STEP_ARCH, STEP_IMG, STEP_BATCH = "vit_tiny_patch16_224", 64, 64
BUSY = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end:\n    pass\n"


# ---- the child: one setting, one fresh interpreter --------------------------------------------


def _timed(fns: dict[str, Any], warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):  # alternate, so drift hits both alike
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def layer_ms(b: int, n: int, in_f: int, out_f: int, warmup: int, repeats: int) -> dict[str, float]:
    import torch
    from torch import nn

    from wasi_tool.methods.optim import SubspaceSGD
    from wasi_tool.nn import FactoredLinear, WASILinear

    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f)
    k = min(in_f, out_f) // 4
    wasi = WASILinear.from_factored(
        FactoredLinear.from_linear(dense, k), act_ranks=(b // 4, n // 4, 32)
    ).train()
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.01, weight_decay=1e-4)
    opt_w = SubspaceSGD(wasi, lr=0.01, weight_decay=1e-4, clip=None)
    x, dy = torch.randn(b, n, in_f), torch.randn(b, n, out_f)

    def step_dense() -> None:
        opt_d.zero_grad(set_to_none=True)
        dense(x.detach().requires_grad_()).backward(dy)
        opt_d.step()

    def step_wasi() -> None:
        opt_w.zero_grad()
        wasi(x.detach().requires_grad_()).backward(dy)
        opt_w.step()

    return _timed({"vanilla": step_dense, "wasi": step_wasi}, warmup, repeats)


def step_ms(warmup: int, repeats: int) -> dict[str, float]:
    import timm
    import torch

    import wasi_tool
    from wasi_tool.training.loop import train_step

    torch.manual_seed(0)
    x = torch.randn(STEP_BATCH, 3, STEP_IMG, STEP_IMG)
    y = torch.randint(0, 10, (STEP_BATCH,))
    fns = {}
    for method in ("vanilla", "wasi"):
        model = timm.create_model(STEP_ARCH, img_size=STEP_IMG, num_classes=10).train()
        model, opt = wasi_tool.prepare(
            model,
            method=method,
            targets="mlp",
            eps=0.8,
            lr=0.01,
            example_input=x[:16],
            verbose=False,
        )
        fns[method] = lambda m=model, o=opt: train_step(m, o, x, y)
    return _timed(fns, warmup, repeats)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if spec["threads"] is not None:
        torch.set_num_threads(spec["threads"])
    w, r = spec["warmup"], spec["repeats"]
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "layers": {}}
    for name, (b, n, i, o) in LAYERS.items():
        if spec["quick"] and name.startswith("vit-b32"):
            continue
        # the toy layers are ~20x cheaper: more repeats for the same noise
        scale = 1 if name.startswith("vit-b32") else 3
        out["layers"][name] = layer_ms(b, n, i, o, w * scale, r * scale)
    out["step"] = step_ms(w, r)
    return out


# ---- the parent: settings, busy processes, rounds ----------------------------------------------


def start_busy(n: int, seconds: float) -> list[subprocess.Popen[bytes]]:
    code = BUSY.format(s=seconds)
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def stop_busy(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def run_setting(setting: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.pop("GOMP_SPINCOUNT", None)
    if setting["policy"].startswith("spin"):  # unset policy, GNU OpenMP's spin count bounded
        env["GOMP_SPINCOUNT"] = setting["policy"].removeprefix("spin")
    elif setting["policy"] != "unset":
        env["OMP_WAIT_POLICY"] = setting["policy"]
    if setting["threads"] is not None:
        env["OMP_NUM_THREADS"] = str(setting["threads"])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    spec = {
        "threads": setting["threads"],
        "warmup": args.warmup,
        "repeats": args.repeats,
        "quick": args.quick,
    }
    busy = start_busy(setting["busy"], args.busy_seconds)
    try:
        time.sleep(0.5 if busy else 0)  # the spinners are running before torch starts
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
            timeout=args.busy_seconds,
            check=False,
        )
    except subprocess.TimeoutExpired:  # the busy processes stop then: a result past it is moot
        return {"timed_out_after_s": args.busy_seconds, "spec": spec}
    finally:
        stop_busy(busy)
    if proc.returncode != 0:
        raise SystemExit(f"setting {setting} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "spec": spec}


def settings(
    cores: int, loads: list[int], fewer_at: list[int], policies: list[str]
) -> list[dict[str, Any]]:
    out = []
    for busy in loads:
        for policy in policies:
            out.append({"policy": policy, "busy": busy, "threads": None})
            if busy in fewer_at and cores > 1:
                out.append({"policy": policy, "busy": busy, "threads": cores - 1})
    return out


def parse_key(k: str) -> dict[str, Any]:
    parts = dict(p.split("=") for p in k.split())
    threads = None if parts["threads"] == "all" else int(parts["threads"])
    return {"policy": parts["policy"], "busy": int(parts["busy"]), "threads": threads}


def key(s: dict[str, Any]) -> str:
    threads = "all" if s["threads"] is None else str(s["threads"])
    return f"policy={s['policy']} busy={s['busy']} threads={threads}"


def merge(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{measurement: {method: median over rounds (ms)}}."""
    rows: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        if "layers" not in run:  # timed out
            continue
        for name, ms in [*run["layers"].items(), ("whole step (toy ViT)", run["step"])]:
            for method, v in ms.items():
                rows.setdefault(name, {}).setdefault(method, []).append(v)
    return {n: {m: round(statistics.median(v), 2) for m, v in r.items()} for n, r in rows.items()}


def uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--policies",
        default="unset,PASSIVE",
        help="wait policies to run: unset, PASSIVE, ACTIVE, or spinN (policy unset, "
        "GOMP_SPINCOUNT=N: idle threads spin N times, then sleep)",
    )
    parser.add_argument("--loads", default="0,1,2", help="busy background processes per setting")
    parser.add_argument(
        "--fewer-threads-at", default="1,2", help="loads at which cores - 1 threads run too"
    )
    parser.add_argument(
        "--busy-seconds", type=float, default=600, help="each busy process stops after this"
    )
    parser.add_argument("--quick", action="store_true", help="toy layers and the step only")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--resume", type=Path, default=None, help="keep the runs of this (partial) JSON"
    )
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return

    cores = os.cpu_count() or 1
    fewer = [int(v) for v in args.fewer_threads_at.split(",") if v]
    policies = [v for v in args.policies.split(",") if v]
    for v in policies:
        if v not in POLICIES and not (v.startswith("spin") and v[4:].isdigit()):
            raise SystemExit(f"unknown policy {v!r}: unset, PASSIVE, ACTIVE or spinN")
    todo = settings(cores, [int(v) for v in args.loads.split(",")], fewer, policies)
    load_before, start = uptime(), time.time()
    print(f"{cores} cores; load average before: {load_before}; {len(todo)} settings")
    runs: dict[str, list[dict[str, Any]]] = {key(s): [] for s in todo}
    if args.resume is not None:  # settings done before (with their own spec) are kept
        for k, v in json.loads(args.resume.read_text())["runs"].items():
            runs[k] = v
            if not any(key(s) == k for s in todo):
                todo.append(parse_key(k))
    for r in range(args.rounds):
        order = todo[r % len(todo) :] + todo[: r % len(todo)]  # rotate the order each round
        for s in order:
            if len(runs[key(s)]) > r:
                continue
            t = time.perf_counter()
            result = run_setting(s, args)
            runs[key(s)].append(result)
            print(f"round {r + 1} {key(s)}: {time.perf_counter() - t:.0f} s {result}", flush=True)
            if args.json:  # what is done so far survives an interrupted run
                args.json.parent.mkdir(parents=True, exist_ok=True)
                partial = {"benchmark": "contention", "partial": True, "runs": runs}
                args.json.write_text(json.dumps(partial, indent=2) + "\n")
    load_after = uptime()

    merged = {k: merge(v) for k, v in runs.items()}
    table: dict[str, Any] = {}
    for s in todo:
        k = key(s)
        quiet = merged.get(key({"policy": s["policy"], "busy": 0, "threads": None}), {})
        rows = {}
        for name, ms in merged[k].items():
            rows[name] = {
                **{f"{m}_ms": v for m, v in ms.items()},
                "wasi_speedup": round(ms["vanilla"] / ms["wasi"], 3),
                **{
                    f"{m}_slowdown": round(v / quiet[name][m], 3)
                    for m, v in ms.items()
                    if name in quiet
                },
            }
        done = [run for run in runs[k] if "layers" in run]
        table[k] = {
            **s,
            "threads_used": done[0]["threads"] if done else None,
            "timed_out": [run["timed_out_after_s"] for run in runs[k] if "layers" not in run],
            "rows": rows,
        }

    names = list(dict.fromkeys(n for m in merged.values() for n in m))
    for name in names:
        print(f"\n{name}")
        print(
            f"  {'setting':<40} {'vanilla ms':>10} {'wasi ms':>9} {'speedup':>8} "
            f"{'van slow':>8} {'wasi slow':>9}"
        )
        for k, t in table.items():
            if name not in t["rows"]:
                if t["timed_out"]:
                    print(f"  {k:<40} timed out after {t['timed_out'][0]:.0f} s")
                continue
            row = t["rows"][name]
            print(
                f"  {k:<40} {row['vanilla_ms']:>10.1f} {row['wasi_ms']:>9.1f} "
                f"{row['wasi_speedup']:>7.2f}x {row.get('vanilla_slowdown', 0):>7.2f}x "
                f"{row.get('wasi_slowdown', 0):>8.2f}x"
            )
    print(f"\nload average before: {load_before}; after: {load_after}")
    if args.json:
        import torch

        payload = {
            "benchmark": "contention",
            "cores": cores,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "wall_seconds": round(time.time() - start),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "settings": table,
            "runs": runs,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
