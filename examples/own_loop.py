"""Your own PyTorch ViT, your own loop: compress, train with WASI, evaluate, save, export.

python examples/own_loop.py --tiny                      # random data, seconds
python examples/own_loop.py --data ../shared/data/cifar10_subset.npz --epochs 3
PYTHONPATH=examples wasi-tool export runs/own-vit --model-class vit_model:ViT --out runs/o-onnx
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from vit_model import ViT

import wasi_tool


def load(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    if args.tiny or args.data is None:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(64, 3, args.img_size, args.img_size, generator=gen)
        y = torch.randint(0, 10, (64,), generator=gen)
        return x[:48], y[:48], x[48:], y[48:]
    with np.load(args.data) as d:  # the arrays of an .npz: x_train (N, 32, 32, 3) uint8, ...
        arrays = {k: d[k] for k in d.files}
    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])

    def images(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(a).float().div(255).permute(0, 3, 1, 2)
        return (x - mean[:, None, None]) / std[:, None, None]

    return (
        images(arrays["x_train"]),
        torch.from_numpy(arrays["y_train"]).long(),
        images(arrays["x_test"]),
        torch.from_numpy(arrays["y_test"]).long(),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="random data, a small model, 2 epochs")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--method", default="wasi")
    p.add_argument("--eps", type=float, default=0.8)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("runs/own-vit"))
    args = p.parse_args()
    if args.tiny:
        args.epochs, args.img_size = 2, 16
    torch.manual_seed(0)
    config = {"img_size": args.img_size, "dim": 32 if args.tiny else 64, "depth": 2}
    model = ViT(**config)  # load your pretrained state dict here
    x_train, y_train, x_test, y_test = load(args)

    # one call: factor the MLP linears at eps, pick activation ranks on a batch, the optimiser
    model, optimizer = wasi_tool.prepare(
        model,
        method=args.method,
        targets="mlp",
        eps=args.eps,
        lr=args.lr,
        clip=2.0,
        example_input=x_train[: args.batch_size],
    )
    print(model.wasi_prepared)  # what prepare did (the library logs it; it never prints)
    steps = args.epochs * -(-len(x_train) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for idx in order.split(args.batch_size):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(-1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {acc:.3f}")
    wasi_tool.save_artifact(
        model, args.out, example_input=x_train[:1], config=config, overwrite=True
    )
    print(
        f"saved {args.out}; export: PYTHONPATH=examples wasi-tool export {args.out} "
        f"--model-class vit_model:ViT --out {args.out}-onnx"
    )


if __name__ == "__main__":
    main()
