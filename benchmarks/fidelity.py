"""Fidelity on real activations and gradients: weight-gradient error, perplexity, saved bytes.

Model: the accuracy benchmark's small ViT pretrained on CIFAR-10 classes 0-4
(pipelines/cifar5_pretrain.toml; run benchmarks/accuracy.py or `wasi-tool run` first), with a
fresh 5-class head, on batches of 64 training images of classes 5-9. Per linear of the blocks:

- rel. dW error: ||dW_asi - dW|| / ||dW|| where dW = dY^T A is the exact weight gradient and
  dW_asi = dY^T A~ with A~ the Tucker approximation ASI keeps: activation ranks by the eps rule
  on the first batch (as finetune's --act-eps), bases warm-started by one subspace iteration per
  batch, as in training; reported on the last of --batches batches. "hosvd" gives the error of
  the truncated HOSVD at the same ranks on that batch (the best a one-shot basis can do).
- perplexity: exp(H) of the normalised energy spectrum p_i = s_i^2 / sum s_j^2 of each mode of
  the activation (B, N, C) and of the weight: the effective number of directions the tensor
  uses (our reading of the WASI paper's "perplexity" figure: the larger, the more rank is
  needed for the same explained variance).
- saved bytes: a WASILinear (weight rank min(O, I)/4, the ranks above) run on the real
  activation with an input that requires grad; bytes autograd saved (saved_tensors_hooks, each
  storage once, parameters out) vs the formula 4 (r1 r2 r3 + B r1 + N r2 + C r3).

    python benchmarks/fidelity.py --json benchmarks/results/fidelity.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from wasi_tool.data import batch_transform, load_data
from wasi_tool.measure import SavedBytesMeter
from wasi_tool.methods.calibrate import capture, gradient_error, spectra
from wasi_tool.models import ModelSource, load_model
from wasi_tool.models.targets import select_targets
from wasi_tool.nn import FactoredLinear, WASILinear
from wasi_tool.nn.subspace import ActivationBases
from wasi_tool.ops.accounting import tucker_elements
from wasi_tool.ops.tucker import tucker_expand

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10_subset.npz"


def perplexity(s: torch.Tensor) -> float:
    p = s.double() ** 2
    p = p[p > 0] / p.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def saved_bytes(layer: torch.nn.Linear, a: torch.Tensor, ranks: tuple[int, ...]) -> int:
    k = min(layer.in_features, layer.out_features) // 4
    wasi = WASILinear.from_factored(FactoredLinear.from_linear(layer, k), act_ranks=ranks).train()
    meter = SavedBytesMeter(wasi)
    with meter:
        out = wasi(a.detach().clone().requires_grad_())
    out.sum().backward()
    return meter.total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "runs" / "cifar5" / "pretrain")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.6, 0.8, 0.9])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not (args.model / "manifest.json").is_file():
        raise SystemExit(f"no model at {args.model}: run pipelines/cifar5_pretrain.toml first")

    torch.manual_seed(0)
    loaded = load_model(ModelSource(checkpoint=args.model))
    model = loaded.model
    model.reset_classifier(5)  # type: ignore[operator]
    transform = batch_transform(loaded)
    data = load_data(DATA, transform.size, classes=[5, 6, 7, 8, 9])
    loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size, shuffle=False)
    batches = [(transform(x), y) for _, (x, y) in zip(range(args.batches), loader, strict=False)]
    names = select_targets(model, "all")
    captured = [capture(model, names, x, y, F.cross_entropy) for x, y in batches]
    rows: list[dict[str, Any]] = []
    for name in names:
        layer = model.get_submodule(name)
        first = spectra(captured[0][name][0])
        a_last, dy_last = captured[-1][name]
        assert dy_last is not None
        a64, dy64 = a_last.double(), dy_last.double()
        dw = dy64.reshape(-1, dy64.shape[-1]).T @ a64.reshape(-1, a64.shape[-1])
        norm = float(torch.linalg.matrix_norm(dw))
        last = spectra(a_last)
        row: dict[str, Any] = {
            "layer": name,
            "act_shape": list(a_last.shape),
            "perplexity_act": [round(perplexity(s), 2) for s in last.values],
            "perplexity_weight": round(
                perplexity(torch.linalg.svdvals(layer.weight.detach().double())), 2
            ),
            "by_eps": {},
        }
        for eps in args.eps:
            ranks = first.ranks(eps)
            bases = ActivationBases(ranks, seed=0)
            for step in captured:
                core, us = bases.compress(step[name][0])
            approx = tucker_expand(core.double(), [u.double() for u in us])
            dw_asi = dy64.reshape(-1, dy64.shape[-1]).T @ approx.reshape(-1, a64.shape[-1])
            measured = saved_bytes(layer, a_last, ranks)
            formula = 4 * tucker_elements(
                a_last.shape, [min(r, d) for r, d in zip(ranks, a_last.shape, strict=True)]
            )
            row["by_eps"][str(eps)] = {
                "ranks": list(ranks),
                "rel_dw_error_asi": float(torch.linalg.matrix_norm(dw_asi - dw)) / norm,
                "rel_dw_error_hosvd": gradient_error(a_last, dy_last, last, ranks) / norm,
                "saved_bytes_measured": measured,
                "saved_bytes_formula": formula,
                "formula_over_measured": formula / measured,
            }
        rows.append(row)
    print("| layer | (B, N, C) | perplexity B / N / C | weight | eps | ranks | rel dW err (ASI) "
          "| (HOSVD) | saved: formula / measured |")  # fmt: skip
    print("| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        for eps, e in r["by_eps"].items():
            print(
                f"| {r['layer']} | {tuple(r['act_shape'])} | "
                f"{' / '.join(f'{p:.1f}' for p in r['perplexity_act'])} | "
                f"{r['perplexity_weight']:.1f} | {eps} | {tuple(e['ranks'])} | "
                f"{e['rel_dw_error_asi']:.3f} | {e['rel_dw_error_hosvd']:.3f} | "
                f"{e['formula_over_measured']:.3f} |"
            )
    summary = {}
    for eps in args.eps:
        es = [r["by_eps"][str(eps)] for r in rows]
        ratio = [e["formula_over_measured"] for e in es]
        summary[str(eps)] = {
            "median_rel_dw_error_asi": statistics.median(e["rel_dw_error_asi"] for e in es),
            "median_rel_dw_error_hosvd": statistics.median(e["rel_dw_error_hosvd"] for e in es),
            "formula_over_measured_min": min(ratio),
            "formula_over_measured_max": max(ratio),
            "within_10_percent": all(abs(x - 1) <= 0.10 for x in ratio),
        }
        s = summary[str(eps)]
        print(
            f"eps {eps}: median rel dW error {s['median_rel_dw_error_asi']:.3f} (ASI, warm) / "
            f"{s['median_rel_dw_error_hosvd']:.3f} (HOSVD); analytic/measured saved bytes "
            f"{s['formula_over_measured_min']:.3f}..{s['formula_over_measured_max']:.3f} -> "
            f"target within 10%: {'met' if s['within_10_percent'] else 'missed'}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": "fidelity",
            "model": str(args.model),
            "batches": args.batches,
            "batch_size": args.batch_size,
            "summary": summary,
            "rows": rows,
            "date": time.strftime("%Y-%m-%d"),
            "note": "perplexity = exp(entropy of s^2 / sum s^2), per mode",
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    assert math.isfinite(sum(r["perplexity_weight"] for r in rows))


if __name__ == "__main__":
    main()
