"""Unbiased activation estimate vs plain ASI at equal memory: bias, variance, total error.

On real layer inputs (CIFAR-10 images through the accuracy benchmark's small ViT: 32 px,
4-px patches, width 128, 6 blocks; the pretrained artifact runs/cifar5[full]/pretrain when it
exists, else the same ViT randomly initialised, seed 0), per target linear, with the exact
dW = dY^T A of the last of --batches batches of 64 images (classes 5-9) as the reference:

- plain ASI at ranks r (the eps rule on the first batch, bases warm-started by one subspace
  iteration per batch, as in training): dW~ = dY^T A~, deterministic, so its error is bias;
- plain ASI at higher ranks with the same saved bytes as (r + m residual rows): the eps-rule
  ranks with the most bytes within that budget, then filled greedily (one more rank in the
  mode with the most energy per byte) up to it;
- unbiased at (r, m): dW^ = dY^T A~ + sum of m sampled residual rows / (m p_i), --draws
  draws (p_i proportional to ||D_i||, and uniform). Measured: bias = ||mean dW^ - dW|| / ||dW||
  (its noise floor sqrt(var / draws) beside it), variance = mean ||dW^ - mean||^2 / ||dW||^2
  (and the exact formula (sum_i ||dY_i||^2 ||D_i||^2 / p_i - ||dY^T D||^2) / m / ||dW||^2),
  total = sqrt(mean ||dW^ - dW||^2) / ||dW||.
- batch noise: mean ||dW_b - mean_b dW_b||^2 / ||mean_b dW_b||^2 of the exact per-batch dW
  over the --batches batches: SGD's own gradient noise, to read the variance against.
- saved bytes, measured (SavedBytesMeter, an ASILinear on the real input with requires_grad)
  for r and (r, m): the extra must equal m I 4 + 8 m.

--pretrain-steps N > 0 first trains the model N vanilla steps on classes 0-4 (a stand-in for
the pretrained artifact; its test accuracy on classes 0-4 is recorded) and gives it a fresh
head.

--train-steps N > 0 adds a short accuracy run (1 seed): the same ViT trained from where it
starts for N steps of batch 64 on classes 5-9 with every block linear an ASILinear at the
eps-rule ranks (--train-eps, on one batch): plain at r, plain at the equal-memory ranks,
unbiased at (r, --train-rows), and "exact" (the nn.Linear targets left as they are; --arms
picks which run); SGD, momentum 0.9, cosine lr, clip 1; test accuracy on the 1,000 test images
of classes 5-9.

    python benchmarks/unbiased.py --json benchmarks/results/unbiased.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wasi_tool.data import batch_transform, load_data
from wasi_tool.measure import SavedBytesMeter
from wasi_tool.methods.calibrate import LayerSpectra, capture, spectra
from wasi_tool.models import ModelSource, load_model
from wasi_tool.models.loading import LoadedModel
from wasi_tool.models.targets import select_targets
from wasi_tool.nn import ASILinear
from wasi_tool.nn.subspace import ActivationBases
from wasi_tool.nn.swap import set_submodule
from wasi_tool.ops.accounting import tucker_elements
from wasi_tool.ops.residual import (
    residual_row_norms,
    residual_saved_bytes,
    residual_weight_grad,
    sample_residual_rows,
    sampling_probabilities,
    tucker_rows,
)
from wasi_tool.ops.tucker import tucker_expand

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10_subset.npz"
PRETRAINED = [
    ROOT / "runs" / "cifar5full" / "pretrain",
    ROOT / "runs" / "cifar5" / "pretrain",
    ROOT.parent / "main" / "runs" / "cifar5full" / "pretrain",
    ROOT.parent / "main" / "runs" / "cifar5" / "pretrain",
]
VIT = {
    "arch": "vit_tiny_patch16_224",
    "img_size": 32,
    "model_kwargs": {"patch_size": 4, "embed_dim": 128, "depth": 6, "num_heads": 4},
}
LAYERS = [
    "blocks.1.attn.qkv",
    "blocks.1.mlp.fc1",
    "blocks.1.mlp.fc2",
    "blocks.4.attn.proj",
    "blocks.4.mlp.fc1",
    "blocks.4.mlp.fc2",
]
EPS_GRID = [round(0.5 + 0.005 * k, 3) for k in range(100)] + [0.999, 0.9999]


def load_vit(model_dir: Path | None) -> tuple[LoadedModel, str]:
    if model_dir is not None:
        loaded = load_model(ModelSource(checkpoint=model_dir))
        loaded.model.reset_classifier(5)  # type: ignore[operator]
        return loaded, str(model_dir)
    src = ModelSource(
        arch=str(VIT["arch"]),
        img_size=int(VIT["img_size"]),  # type: ignore[call-overload]
        random_init=True,
        seed=0,
        num_classes=5,
        model_kwargs=dict(VIT["model_kwargs"]),  # type: ignore[call-overload]
    )
    return load_model(src), "random init (seed 0): no pretrained artifact found"


def act_bytes(shape: tuple[int, ...], ranks: tuple[int, ...]) -> int:
    return 4 * tucker_elements(shape, [min(r, d) for r, d in zip(ranks, shape, strict=True)])


def warm(
    a_list: list[torch.Tensor], ranks: tuple[int, ...]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Plain ASI through the batches (one subspace iteration each); the last batch's factors."""
    bases = ActivationBases(ranks, seed=0)
    for a in a_list:
        core, us = bases.compress(a)
    return core, us


def equal_memory_ranks(
    spec: LayerSpectra, shape: tuple[int, ...], budget: int
) -> tuple[tuple[int, ...], int]:
    """Plain ASI ranks that fill ``budget``: the eps-rule ranks with the most bytes within it,
    then greedily one more rank in the mode with the most energy gained per byte, while the
    bytes stay within the budget."""
    best: tuple[tuple[int, ...], int] | None = None
    for eps in EPS_GRID:
        ranks = spec.ranks(eps)
        b = act_bytes(shape, ranks)
        if b <= budget and (best is None or b > best[1]):
            best = (ranks, b)
    assert best is not None
    ranks_l = list(best[0])
    while True:
        options = []
        for mode, s in enumerate(spec.values):
            r = ranks_l[mode]
            if r >= min(shape[mode], s.numel()):
                continue
            bumped = [*ranks_l[:mode], r + 1, *ranks_l[mode + 1 :]]
            b = act_bytes(shape, tuple(bumped))
            if b <= budget:
                gain = float(s[r].double() ** 2 / s.double().pow(2).sum())
                options.append((gain / (b - act_bytes(shape, tuple(ranks_l))), mode))
        if not options:
            break
        ranks_l[max(options)[1]] += 1
    ranks = tuple(ranks_l)
    return ranks, act_bytes(shape, ranks)


def rel(x: torch.Tensor, norm: float) -> float:
    return float(torch.linalg.matrix_norm(x)) / norm


def measured_bytes(layer: nn.Linear, a: torch.Tensor, ranks: tuple[int, ...], m: int) -> int:
    asi = ASILinear.from_linear(layer, ranks, act_residual_rows=m).train()
    meter = SavedBytesMeter(asi)
    with meter:
        out = asi(a.detach().clone().requires_grad_())
    out.sum().backward()
    return meter.total


def fidelity(
    name: str,
    layer: nn.Linear,
    captured: list[dict[str, tuple[torch.Tensor, torch.Tensor | None]]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    a_list = [c[name][0] for c in captured]
    dys = [c[name][1] for c in captured]
    assert all(d is not None for d in dys)
    a, dy = a_list[-1], dys[-1]
    assert dy is not None
    shape = tuple(a.shape)
    i_dim = shape[-1]
    flat_a = a.double().reshape(-1, i_dim)
    flat_dy = dy.double().reshape(-1, dy.shape[-1])
    dw = flat_dy.T @ flat_a
    norm = float(torch.linalg.matrix_norm(dw))
    per_batch = [
        d.double().reshape(-1, d.shape[-1]).T @ x.double().reshape(-1, i_dim)  # type: ignore[union-attr]
        for x, d in zip(a_list, dys, strict=True)
    ]
    mean_dw = torch.stack(per_batch).mean(0)
    batch_noise = sum(float((g - mean_dw).pow(2).sum()) for g in per_batch) / len(per_batch)
    batch_noise /= float(mean_dw.pow(2).sum())
    spec = spectra(a_list[0])
    row: dict[str, Any] = {"layer": name, "act_shape": list(shape), "batch_noise": batch_noise}
    row["by_eps"] = {}
    for eps in args.eps:
        ranks = spec.ranks(eps)
        core, bases = warm(a_list, ranks)
        approx = tucker_expand(core.double(), [u.double() for u in bases]).reshape(-1, i_dim)
        base_grad = flat_dy.T @ approx
        plain_bytes = act_bytes(shape, ranks)
        d = flat_a - approx
        norms = residual_row_norms(
            a.reshape(-1, i_dim), tucker_rows(core, bases), bases[-1]
        ).double()
        entry: dict[str, Any] = {
            "ranks": list(ranks),
            "bytes": plain_bytes,
            "bytes_measured": measured_bytes(layer, a, ranks, 0),
            "plain_rel_error": rel(base_grad - dw, norm),
            "residual_energy": float(d.pow(2).sum() / flat_a.pow(2).sum()),
            "by_rows": {},
        }
        for m in args.rows:
            budget = plain_bytes + residual_saved_bytes(m, i_dim)
            eq_ranks, eq_bytes = equal_memory_ranks(spec, shape, budget)
            eq_core, eq_bases = warm(a_list, eq_ranks)
            eq_approx = tucker_expand(eq_core.double(), [u.double() for u in eq_bases])
            eq_err = rel(flat_dy.T @ eq_approx.reshape(-1, i_dim) - dw, norm)
            res: dict[str, Any] = {
                "bytes": budget,
                "bytes_measured": measured_bytes(layer, a, ranks, m),
                "equal_memory_asi": {
                    "ranks": list(eq_ranks),
                    "bytes": eq_bytes,
                    "rel_error": eq_err,
                },
            }
            for sampling in args.sampling:
                gen = torch.Generator().manual_seed(0)
                samples = []
                for _ in range(args.draws):
                    rows, idx = sample_residual_rows(a, core, bases, m, gen, sampling)
                    samples.append(
                        base_grad + residual_weight_grad(dy.double(), rows.double(), idx)
                    )
                draws = torch.stack(samples)
                mean = draws.mean(0)
                var = float((draws - mean).pow(2).sum((1, 2)).mean()) / norm**2
                p = sampling_probabilities(norms, sampling)
                g_res = flat_dy.T @ d
                exact_var = (
                    float((flat_dy.pow(2).sum(1) * d.pow(2).sum(1) / p).sum() - g_res.pow(2).sum())
                    / m
                    / norm**2
                )
                total = math.sqrt(float((draws - dw).pow(2).sum((1, 2)).mean())) / norm
                res[sampling] = {
                    "bias": rel(mean - dw, norm),
                    "bias_noise_floor": math.sqrt(exact_var / args.draws),
                    "variance": var,
                    "variance_formula": exact_var,
                    "total_rel_error": total,
                    "total_rel_error_formula": math.sqrt(exact_var),
                }
            entry["by_rows"][str(m)] = res
        row["by_eps"][str(eps)] = entry
    return row


def pretrain_(loaded: LoadedModel, steps: int, batch_size: int, lr: float) -> dict[str, Any]:
    """A short vanilla pretraining on classes 0-4 (SGD, momentum 0.9, cosine lr, clip 1), then a
    fresh 5-class head: a stand-in for the pretrained artifact when there is none."""
    model = loaded.model
    transform = batch_transform(loaded)
    data = load_data(DATA, transform.size, classes=[0, 1, 2, 3, 4])
    loader = torch.utils.data.DataLoader(
        data.train,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    step, losses = 0, []
    while step < steps:
        for x, y in loader:
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(model(transform(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            step += 1
            if step >= steps:
                break
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(data.test, batch_size=250):
            correct += int((model(transform(x)).argmax(1) == y).sum())
            total += len(y)
    model.reset_classifier(5)  # type: ignore[operator]
    return {
        "steps": steps,
        "classes": [0, 1, 2, 3, 4],
        "test_accuracy_classes_0_4": correct / total,
        "train_loss_last_20": sum(losses[-20:]) / len(losses[-20:]),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over layers per (eps, m, sampling), and on how many layers each estimator wins."""
    out: dict[str, Any] = {}
    for eps in rows[0]["by_eps"]:
        for m in rows[0]["by_eps"][eps]["by_rows"]:
            cells = [(r["by_eps"][eps], r["by_eps"][eps]["by_rows"][m]) for r in rows]
            for s in [k for k in cells[0][1] if k in ("norm", "uniform")]:
                unb = [c[s]["total_rel_error"] for _, c in cells]
                eq = [c["equal_memory_asi"]["rel_error"] for _, c in cells]
                out[f"eps {eps}, m {m}, {s}"] = {
                    "median_plain_rel_error": statistics.median(
                        e["plain_rel_error"] for e, _ in cells
                    ),
                    "median_equal_memory_rel_error": statistics.median(eq),
                    "median_unbiased_total_rel_error": statistics.median(unb),
                    "median_unbiased_bias": statistics.median(c[s]["bias"] for _, c in cells),
                    "median_unbiased_variance": statistics.median(
                        c[s]["variance"] for _, c in cells
                    ),
                    "layers_unbiased_beats_equal_memory": sum(
                        u < q for u, q in zip(unb, eq, strict=True)
                    ),
                    "layers": len(cells),
                    "median_bytes_over_plain": statistics.median(
                        c["bytes"] / e["bytes"] for e, c in cells
                    ),
                }
    return out


def accuracy_run(loaded: LoadedModel, args: argparse.Namespace) -> dict[str, Any]:
    """Train the ViT from its start on classes 5-9 with every block linear an ASILinear."""
    import copy

    transform = batch_transform(loaded)
    data = load_data(DATA, transform.size, classes=[5, 6, 7, 8, 9])
    start = copy.deepcopy(loaded.model)
    names = select_targets(start, "all")
    gen = torch.Generator().manual_seed(1)
    idx = torch.randperm(len(data.train), generator=gen)[: args.batch_size]  # type: ignore[arg-type]
    x0 = transform(torch.stack([data.train[int(i)][0] for i in idx]))
    y0 = torch.tensor([data.train[int(i)][1] for i in idx])
    cap = capture(start, names, x0, y0, F.cross_entropy)
    specs = {n: spectra(cap[n][0]) for n in names}
    m = args.train_rows
    eps = args.train_eps
    arms: dict[str, dict[str, tuple[tuple[int, ...], int]]] = {
        "exact": {},  # the plain nn.Linear targets: the exact gradient
        "plain": {},
        "equal": {},
        "unbiased": {},
    }
    for n in names:
        shape = tuple(cap[n][0].shape)
        ranks = specs[n].ranks(eps)
        budget = act_bytes(shape, ranks) + residual_saved_bytes(m, shape[-1])
        arms["plain"][n] = (ranks, 0)
        arms["equal"][n] = (equal_memory_ranks(specs[n], shape, budget)[0], 0)
        arms["unbiased"][n] = (ranks, m)
    out: dict[str, Any] = {"steps": args.train_steps, "eps": eps, "rows": m, "arms": {}}
    test = torch.utils.data.DataLoader(data.test, batch_size=250)
    for arm, spec in arms.items():
        if arm not in args.arms:
            continue
        torch.manual_seed(0)
        model = copy.deepcopy(start)
        for k, n in enumerate(spec):
            ranks, rows = spec[n]
            layer = model.get_submodule(n)
            set_submodule(
                model, n, ASILinear.from_linear(layer, ranks, seed=k, act_residual_rows=rows)
            )
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        loader = torch.utils.data.DataLoader(
            data.train,
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(0),
        )
        step, began, losses = 0, time.perf_counter(), []
        while step < args.train_steps:
            for x, y in loader:
                lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.train_steps))
                for group in opt.param_groups:
                    group["lr"] = lr
                loss = F.cross_entropy(model(transform(x)), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                losses.append(loss.item())
                step += 1
                if step >= args.train_steps:
                    break
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in test:
                correct += int((model(transform(x)).argmax(1) == y).sum())
                total += len(y)
        saved = 0
        model.train()
        meter = SavedBytesMeter(model, names)
        with meter:
            loss = F.cross_entropy(model(x0), y0)
        loss.backward()
        saved = meter.targets
        out["arms"][arm] = {
            "test_accuracy": correct / total,
            "test_images": total,
            "final_loss_mean_last_20": sum(losses[-20:]) / len(losses[-20:]),
            "saved_bytes_targets_measured": saved,
            "seconds": time.perf_counter() - began,
        }
        print(f"accuracy run, {arm}: {correct / total:.4f} ({saved / 2**20:.2f} MiB saved "
              f"in targets, {time.perf_counter() - began:.0f} s)", flush=True)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--layers", nargs="*", default=LAYERS, help="none: accuracy run only")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.6, 0.8])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--sampling", nargs="+", default=["norm", "uniform"])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=0)
    parser.add_argument("--train-eps", type=float, default=0.8)
    parser.add_argument("--train-rows", type=int, default=16)
    parser.add_argument("--arms", nargs="+", default=["exact", "plain", "equal", "unbiased"])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model_dir = args.model or next((p for p in PRETRAINED if (p / "manifest.json").is_file()), None)
    loaded, where = load_vit(model_dir)
    began = time.perf_counter()
    pretrained = None
    if args.pretrain_steps > 0:
        pretrained = pretrain_(loaded, args.pretrain_steps, args.batch_size, args.lr)
        where += f", then {args.pretrain_steps} vanilla steps on classes 0-4 here"
        print(f"pretrained: {pretrained}", flush=True)
    torch.manual_seed(0)
    model = loaded.model
    transform = batch_transform(loaded)
    data = load_data(DATA, transform.size, classes=[5, 6, 7, 8, 9])
    loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size, shuffle=False)
    batches = [(transform(x), y) for _, (x, y) in zip(range(args.batches), loader, strict=False)]
    captured = [capture(model, args.layers, x, y, F.cross_entropy) for x, y in batches]
    rows = []
    for name in args.layers:
        rows.append(fidelity(name, model.get_submodule(name), captured, args))
        print(f"{name}: done ({time.perf_counter() - began:.0f} s)", flush=True)
    print("| layer | eps | ranks | plain err | m | sampling | unbiased bias (floor) | variance "
          "(formula) | total err | equal-mem ranks | equal-mem err | batch noise |")  # fmt: skip
    print("| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for r in rows:
        for eps, e in r["by_eps"].items():
            for m, res in e["by_rows"].items():
                for s in args.sampling:
                    u = res[s]
                    eq = res["equal_memory_asi"]
                    print(
                        f"| {r['layer']} | {eps} | {tuple(e['ranks'])} | "
                        f"{e['plain_rel_error']:.3f} | {m} | {s} | {u['bias']:.3f} "
                        f"({u['bias_noise_floor']:.3f}) | {u['variance']:.3f} "
                        f"({u['variance_formula']:.3f}) | {u['total_rel_error']:.3f} | "
                        f"{tuple(eq['ranks'])} | {eq['rel_error']:.3f} | {r['batch_noise']:.3f} |"
                    )
    payload: dict[str, Any] = {
        "benchmark": "unbiased",
        "model": where,
        "data": str(DATA.name) + " classes 5-9 (train split, in order)",
        "batches": args.batches,
        "batch_size": args.batch_size,
        "draws": args.draws,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, shared and busy",
        "note": "errors relative to ||dW|| of the last batch; bytes fp32 elements x 4, index 8",
        "pretrain": pretrained,
    }
    if args.train_steps > 0:
        payload["accuracy_run"] = accuracy_run(loaded, args)
    payload["seconds_" + ("fidelity" if args.layers else "accuracy")] = time.perf_counter() - began
    if args.layers:
        payload["summary"] = summarise(rows)
        for key, v in payload["summary"].items():
            print(
                f"{key}: median rel. dW error plain {v['median_plain_rel_error']:.3f}, "
                f"equal-memory ASI {v['median_equal_memory_rel_error']:.3f}, unbiased total "
                f"{v['median_unbiased_total_rel_error']:.3f} (bias "
                f"{v['median_unbiased_bias']:.3f}, variance {v['median_unbiased_variance']:.3f});"
                f" unbiased better on {v['layers_unbiased_beats_equal_memory']}/{v['layers']}"
            )
    else:
        del payload["rows"]
    if args.json:
        # a fidelity run and an accuracy run may write the same file: keep the other's part
        if args.json.is_file():
            old = json.loads(args.json.read_text())
            if old.get("benchmark") == "unbiased":
                acc, prev = payload.get("accuracy_run"), old.get("accuracy_run")
                same = ("steps", "eps", "rows")
                if acc and prev and all(acc[k] == prev[k] for k in same):
                    acc["arms"] = {**prev["arms"], **acc["arms"]}  # arms run apart
                payload = {**old, **payload}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
