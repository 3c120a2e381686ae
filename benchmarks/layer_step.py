"""One WASI linear vs nn.Linear + SGD: a full training step, measured in one process.

ViT-B/32 MLP shapes (B=64, N=50; 768->3072 and 3072->768), weight rank K = min(O, I)/4,
activation ranks (B/4, N/4, 32). A step is forward, backward (with an input that requires grad,
as inside a network) and the update. Timing: warm-up, then repeats alternating vanilla and
wasi, median per method. Saved bytes: storages autograd saves (saved_tensors_hooks), each once,
parameters left out (wasi_tool.measure.SavedBytesMeter). Weight memory: parameters plus their
gradients (for WASI the pending gradient factors P, U instead of a .grad). FLOP floor: the
step's FLOPs (wasi_tool.ops.accounting.layer_step_flops: 2 per multiply-add, subspace iterations
and core included) over this machine's sgemm rate (a 2048^3 matmul, measured before and after
the layers, the faster kept); the measured time is then given as a multiple of that floor.
The process runs on the allocator the training bench's workers get (``--allocator auto``:
tcmalloc, else jemalloc; glibc's freed heap made the WASI step 1.2x slower at fc1, 103 vs 84 ms,
2026-12-08); the JSON records it and the OpenMP wait policy.

``--reference PATH`` adds the WASI paper's own layer (``main/custom_op/linear/linear_WASI.py``
of a local clone of github.com/Le-TrungNguyen/ICLR2026-WASI) to the same alternation: weight
rank K and the same activation ranks, its dense W updated by torch.optim.SGD as its trainer
does (its forward re-projects W onto rank K each step). Its random starts are created on the
CPU instead of CUDA (``set_random``), its SVD keeps K values instead of an explained-variance
threshold (``SVD_var``); nothing else of it is changed.

    python benchmarks/layer_step.py --json layer_step.json
    python benchmarks/layer_step.py --reference ../ICLR2026-WASI --json layer_step.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wasi_tool.allocator import ALLOCATORS, in_use, worker_env
from wasi_tool.measure import SavedBytesMeter, pace
from wasi_tool.methods.optim import SubspaceSGD
from wasi_tool.nn import FactoredLinear, WASILinear
from wasi_tool.ops.accounting import layer_step_flops
from wasi_tool.wording import ratio

B, N = 64, 50
SHAPES = [(768, 3072), (3072, 768)]  # (in, out): fc1, fc2


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for one forward (wasi_tool.measure: each storage once, no params)."""
    meter = SavedBytesMeter(layer)
    with meter:
        out = layer(x)
    out.sum().backward()
    return meter.total


def weight_bytes(layer: nn.Module) -> int:
    total = 0
    for p in layer.parameters():
        total += p.numel() * p.element_size()
        if p.grad is not None:
            total += p.grad.numel() * p.grad.element_size()
    if isinstance(layer, WASILinear):
        for t in (layer.sink.p, layer.sink.u):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def sgemm_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def load_reference(repo: Path) -> Any:
    """The reference code's linear_WASI module, its CUDA-only random start and its
    threshold-only SVD rank replaced as the module docstring says."""
    root = repo / "main"
    if not (root / "custom_op" / "linear" / "linear_WASI.py").is_file():
        raise SystemExit(f"{repo} is not a clone of ICLR2026-WASI (no main/custom_op/linear/)")
    sys.path.insert(0, str(root))
    mod = importlib.import_module("custom_op.linear.linear_WASI")
    for name in ("power_iteration", "hosvd_power_iteration"):
        rank_mod: Any = importlib.import_module(f"custom_op.compression.rank.{name}")
        original = rank_mod.set_random

        def on_cpu(
            shape: Any, random_seed: int = 233, device: Any = None, _f: Any = original
        ) -> Any:
            return _f(shape, random_seed, device="cpu")

        rank_mod.set_random = on_cpu
    return mod


def reference_commit(repo: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        out = None
    if out is not None and out.returncode == 0:
        return out.stdout.strip()
    pinned = repo / "COMMIT"  # an exported tree (git archive) with its commit written beside
    return pinned.read_text().strip() if pinned.is_file() else None


def reference_layer(mod: Any, dense: nn.Linear, k: int, act_ranks: tuple[int, ...]) -> nn.Module:
    """The reference Linear_WASI around a copy of ``dense``, its SVD truncated at rank k."""
    svd_var = mod.SVD_var

    def at_rank_k(weight: torch.Tensor, var: Any, use_k: bool = False, device: Any = None) -> Any:
        return svd_var(weight, k, use_k=True)

    mod.SVD_var = at_rank_k
    copy = nn.Linear(dense.in_features, dense.out_features)
    copy.load_state_dict(dense.state_dict())
    return mod.wrap_linearWASI(copy, list(act_ranks), 1.0).train()


def measure(
    in_f: int, out_f: int, warmup: int, repeats: int, reference: Any = None
) -> dict[str, float | int | str]:
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f)
    k = min(in_f, out_f) // 4
    act_ranks = (B // 4, N // 4, 32)
    wasi = WASILinear.from_factored(
        FactoredLinear.from_linear(dense, k), act_ranks=act_ranks
    ).train()
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.01, weight_decay=1e-4)
    opt_w = SubspaceSGD(wasi, lr=0.01, weight_decay=1e-4, clip=None)
    x = torch.randn(B, N, in_f)
    # A dense upstream gradient, as in a network (the gradient of .sum() is a stride-0 view).
    dy = torch.randn(B, N, out_f)

    def step_dense() -> None:
        opt_d.zero_grad(set_to_none=True)
        dense(x.detach().requires_grad_()).backward(dy)
        opt_d.step()

    def step_wasi() -> None:
        opt_w.zero_grad()
        wasi(x.detach().requires_grad_()).backward(dy)
        opt_w.step()

    steps = {"vanilla": step_dense, "wasi": step_wasi}
    if reference is not None:
        ref = reference_layer(reference, dense, k, act_ranks)
        opt_r = torch.optim.SGD(
            [p for p in ref.parameters() if p.requires_grad], lr=0.01, weight_decay=1e-4
        )

        def step_reference() -> None:
            opt_r.zero_grad(set_to_none=True)
            ref(x.detach().requires_grad_()).backward(dy)
            opt_r.step()

        steps["reference"] = step_reference
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):  # alternate, so drift on a shared machine hits both alike
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    t_v, t_w = statistics.median(times["vanilla"]), statistics.median(times["wasi"])
    extra: dict[str, float | int | str] = {}
    if reference is not None:
        t_r = statistics.median(times["reference"])
        extra = {
            "reference_ms": round(t_r * 1e3, 2),
            "reference_vs_vanilla": round(t_v / t_r, 3),
            "wasi_vs_reference": round(t_r / t_w, 3),
        }

    sb_v = saved_bytes(dense, x.detach().requires_grad_())
    opt_w.zero_grad()
    sb_w = saved_bytes(wasi, x.detach().requires_grad_())  # leaves pending factors, as at step
    wb_v, wb_w = weight_bytes(dense), weight_bytes(wasi)
    r1, r2, r3 = act_ranks
    formula = 4 * (r1 * r2 * r3 + B * r1 + N * r2 + in_f * r3)
    flops_v = layer_step_flops((B, N, in_f), out_f, in_f)["total"]
    flops_w = layer_step_flops(
        (B, N, in_f), out_f, in_f, factored=True, compressed=True, rank=k, act_ranks=act_ranks
    )["total"]
    return {
        "shape": f"{in_f}->{out_f}",
        "rank": k,
        "act_ranks": list(act_ranks),
        "vanilla_ms": round(t_v * 1e3, 2),
        "wasi_ms": round(t_w * 1e3, 2),
        "speedup": round(t_v / t_w, 3),
        "vanilla_saved_bytes": sb_v,
        "wasi_saved_bytes": sb_w,
        "wasi_saved_bytes_formula": formula,
        "saved_bytes_ratio": round(sb_v / sb_w, 2),
        "vanilla_weight_bytes": wb_v,
        "wasi_weight_bytes": wb_w,
        "weight_mem_ratio": round(wb_v / wb_w, 3),
        "vanilla_flops": flops_v,
        "wasi_flops": flops_w,
        "vanilla_gflops_per_s": round(flops_v / t_v / 1e9, 1),
        "wasi_gflops_per_s": round(flops_w / t_w / 1e9, 1),
        **extra,
    }


def add_floor(row: dict[str, float | int | str], gemm_gflops: float) -> None:
    """The FLOP floor of each step at this machine's sgemm rate, and time as a multiple of it."""
    for m in ("vanilla", "wasi"):
        floor_ms = float(row[f"{m}_flops"]) / (gemm_gflops * 1e9) * 1e3
        row[f"{m}_floor_ms"] = round(floor_ms, 2)
        row[f"{m}_x_floor"] = round(float(row[f"{m}_ms"]) / floor_ms, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="a local clone of github.com/Le-TrungNguyen/ICLR2026-WASI: time its layer too",
    )
    parser.add_argument(
        "--allocator",
        default="auto",
        choices=ALLOCATORS,
        help="the allocator this process runs on, as the training bench's workers (auto: "
        "tcmalloc, else jemalloc, when installed); the script restarts itself on it. The "
        "OpenMP wait policy stays the shell's (benchmarks/contention.py varies it)",
    )
    args = parser.parse_args()
    env, name = worker_env(args.allocator)
    if name != "system" and in_use() != name and "LAYER_STEP_RESTARTED" not in os.environ:
        preload = {k: v for k, v in env.items() if k != "OMP_WAIT_POLICY"}
        restart = {**os.environ, **preload, "LAYER_STEP_RESTARTED": "1"}  # once, at most
        os.execve(sys.executable, [sys.executable, *sys.argv], restart)

    reference = load_reference(args.reference) if args.reference is not None else None
    before = sgemm_gflops()
    rows = [measure(i, o, args.warmup, args.repeats, reference) for i, o in SHAPES]
    gemm = max(before, sgemm_gflops())
    for r in rows:
        add_floor(r, gemm)
        print(
            f"{r['shape']:>10}  vanilla {r['vanilla_ms']:7.1f} ms ({r['vanilla_x_floor']:.2f}x "
            f"floor {r['vanilla_floor_ms']:.1f})  wasi {r['wasi_ms']:7.1f} ms "
            f"({r['wasi_x_floor']:.2f}x floor {r['wasi_floor_ms']:.1f})  "
            f"step {pace(r['speedup'])}  saved bytes {ratio(r['saved_bytes_ratio'])} "
            f"({r['wasi_saved_bytes']} vs formula {r['wasi_saved_bytes_formula']})  "
            f"weights+grads {ratio(r['weight_mem_ratio'], 'size')}"
        )
        if "reference_ms" in r:
            print(
                f"{'':>10}  reference (paper's code) {r['reference_ms']:7.1f} ms: "
                f"{r['reference_vs_vanilla']:.2f}x vanilla's speed; wasi "
                f"{pace(float(r['wasi_vs_reference']))} than it"
            )
    summary = {
        "speedup": min(float(r["speedup"]) for r in rows),
        "saved_bytes_ratio": min(float(r["saved_bytes_ratio"]) for r in rows),
        "weight_mem_ratio": min(float(r["weight_mem_ratio"]) for r in rows),
    }
    print(
        f"worst of the two shapes: speedup {summary['speedup']:.2f}x, saved bytes "
        f"{summary['saved_bytes_ratio']:.1f}x, weight memory {summary['weight_mem_ratio']:.2f}x; "
        f"sgemm here {gemm:.0f} GFLOP/s"
    )
    goals = {"speedup": 2.0, "saved_bytes_ratio": 30.0, "weight_mem_ratio": 3.0}
    for key, goal in goals.items():
        verdict = "met" if summary[key] >= goal else "missed"
        print(f"target {key} >= {goal}x: {summary[key]:.2f}x -> {verdict}")
    if reference is not None:
        summary["wasi_vs_reference"] = min(float(r["wasi_vs_reference"]) for r in rows)
        worst = pace(summary["wasi_vs_reference"])
        print(f"worst of the two shapes: wasi {worst} than the reference")
    if args.json:
        payload = {
            "benchmark": "layer_step",
            **summary,
            "targets": {"speedup": 2.0, "saved_bytes_ratio": 30.0, "weight_mem_ratio": 3.0},
            "batch": B,
            "tokens": N,
            "threads": torch.get_num_threads(),
            "allocator": in_use(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "sgemm_gflops": round(gemm, 1),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "reference_commit": (
                reference_commit(args.reference) if args.reference is not None else None
            ),
            "rows": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
