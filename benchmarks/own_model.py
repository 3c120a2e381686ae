"""Your own model in your own loop: WASI vs vanilla fine-tuning accuracy (issue 16).

The model is the examples' ViT built on ``nn.TransformerEncoderLayer`` (examples/vit_model.py:
32 px, 4-px patches, width 128, 6 layers, 4 heads, MLP 256), not a timm or torchvision model,
and the loop is a plain PyTorch loop: ``wasi_tool.prepare`` is the only wasi-tool call.

1. Pretrain it from scratch, vanilla, on CIFAR-10 classes 0-4 of ../shared/data/cifar10_subset.npz
   (cached under --work; SGD momentum 0.9, cosine lr, random flips).
2. Fine-tune the pretrained model on the unseen classes 5-9 with each method, in the same loop,
   same data order per seed, same epochs and schedule (SGD lr 0.05 cosine, no momentum: WSI's
   update has none, as in the paper; weight decay 1e-4):
       vanilla            plain torch.optim.SGD, every parameter trains
       wasi (mlp)         prepare(method="wasi", targets="mlp", eps): linear1/linear2 factored at
                          eps, activation ranks at eps from a calibration batch
3. Test accuracy on classes 5-9 (1000 test images), per seed, and the mean.

    python benchmarks/own_model.py --json benchmarks/results/own_model.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from vit_model import ViT  # noqa: E402

import wasi_tool  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10_subset.npz"
CONFIG = {"img_size": 32, "patch": 4, "dim": 128, "depth": 6, "heads": 4, "mlp": 256}
MEAN, STD = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])


def load(classes: list[int]) -> tuple[torch.Tensor, ...]:
    """Train and test images of ``classes`` (labels renumbered 0..len-1), normalised."""
    with np.load(DATA) as d:
        arrays = {k: d[k] for k in d.files}
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"].astype(np.int64)
        keep = np.isin(y, classes)
        images = torch.from_numpy(x[keep]).float().div(255).permute(0, 3, 1, 2)
        images = (images - MEAN[:, None, None]) / STD[:, None, None]
        labels = torch.from_numpy(np.searchsorted(np.array(classes), y[keep]))
        out += [images.contiguous(), labels]
    return tuple(out)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(b).argmax(-1) for b in x.split(500)])
    return float((pred == y).float().mean())


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple[torch.Tensor, ...],
    epochs: int,
    batch_size: int,
    seed: int,
) -> list[dict[str, float]]:
    """The plain loop: flips, cross-entropy, cosine lr per step; test accuracy per epoch."""
    x_train, y_train, x_test, y_test = data
    steps = epochs * -(-len(x_train) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=1e-4)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        model.train()
        t0, losses = time.perf_counter(), []
        for idx in torch.randperm(len(x_train), generator=gen).split(batch_size):
            xb = x_train[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        acc = accuracy(model, x_test, y_test)
        history.append(
            {"epoch": epoch + 1, "train_loss": statistics.fmean(losses), "test_accuracy": acc}
        )
        print(
            f"  epoch {epoch + 1}: loss {history[-1]['train_loss']:.3f}, test accuracy {acc:.4f}"
            f" ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return history


def pretrained(work: Path, epochs: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = work / "pretrain.pt"
    info = work / "pretrain.json"
    if path.exists() and info.exists():
        return torch.load(path, weights_only=True), json.loads(info.read_text())
    print(f"pretraining on classes 0-4, {epochs} epochs", flush=True)
    torch.manual_seed(0)
    model = ViT(**CONFIG, num_classes=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    history = train(model, opt, load([0, 1, 2, 3, 4]), epochs, 64, seed=0)
    work.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    record = {"epochs": epochs, "history": history, "test_accuracy": history[-1]["test_accuracy"]}
    info.write_text(json.dumps(record, indent=2))
    return model.state_dict(), record


def finetune(
    state: dict[str, torch.Tensor], method: str, targets: str, args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = ViT(**CONFIG, num_classes=5)
    head = {k: v for k, v in state.items() if not k.startswith("head.")}
    model.load_state_dict(head, strict=False)  # a new head for the new classes
    data = load([5, 6, 7, 8, 9])
    report = None
    if method == "vanilla":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=0.0, weight_decay=1e-4
        )
    else:
        model, opt = wasi_tool.prepare(
            model,
            method=method,
            targets=targets,
            eps=args.eps,
            lr=args.lr,
            momentum=0.0,  # WSI's update has none (the paper's protocol); vanilla the same
            weight_decay=1e-4,
            example_input=data[0][: args.batch_size],
        )
        report = getattr(model, "wasi_prepared", None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    history = train(model, opt, data, args.epochs, args.batch_size, seed)
    return {
        "seed": seed,
        "test_accuracy": history[-1]["test_accuracy"],
        "history": history,
        "trainable_parameters": trainable,
        "seconds": time.perf_counter() - t0,
        "prepare": str(report) if report is not None else None,
    }


# "all" adds nothing here: the only other linears, nn.MultiheadAttention's out_proj, are read by
# F.multi_head_attention_forward as raw weights, so prepare never targets them (wasi_tool/api.py);
# a run with targets "all" was the "mlp" run again, figure for figure (BENCHMARKS.md, own_model)
RUNS = {"vanilla": ("vanilla", "all"), "wasi (mlp)": ("wasi", "mlp")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "own_model")
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--eps", type=float, default=0.8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    state, pre = pretrained(args.work, args.pretrain_epochs)
    print(f"pretrained on classes 0-4: test accuracy {pre['test_accuracy']:.4f}", flush=True)
    rows: dict[str, list[dict[str, Any]]] = {}
    for seed in args.seeds:  # seeds outer: each method sees the machine at the same time
        for name in args.runs:
            method, targets = RUNS[name]
            print(f"{name}, seed {seed}", flush=True)
            rows.setdefault(name, []).append(finetune(state, method, targets, args, seed))
    base = statistics.fmean(r["test_accuracy"] for r in rows.get("vanilla", [])) if (
        "vanilla" in rows
    ) else None  # fmt: skip
    print("\n| method | trainable params | test accuracy per seed | mean | vs vanilla |")
    print("| --- | ---: | --- | ---: | ---: |")
    table = []
    for name, runs in rows.items():
        mean = statistics.fmean(r["test_accuracy"] for r in runs)
        delta = None if base is None else 100 * (mean - base)
        table.append({"method": name, "mean_test_accuracy": mean, "points_vs_vanilla": delta})
        per_seed = ", ".join(f"{r['test_accuracy']:.4f}" for r in runs)
        print(
            f"| {name} | {runs[0]['trainable_parameters']:,} | {per_seed} | {mean:.4f} | "
            + ("" if delta is None else f"{delta:+.2f} points")
            + " |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": "own_model",
            "model": {"class": "examples/vit_model.py:ViT", **CONFIG},
            "task": "CIFAR-10 subset: pretrain classes 0-4 (vanilla), fine-tune + test 5-9",
            "pretrained": pre,
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "work")},
            "table": table,
            "runs": rows,
            "machine": {
                "platform": platform.platform(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "load_average_1m": os.getloadavg()[0],
            },
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
