"""Federated fine-tuning benchmark (BENCHMARKS.md, "Federated"): bytes per round of wasi
(compress --targets all --rank-ratio 0.25: every block linear travels as its factors L, R) vs
dense FedAvg (vanilla, every parameter travels), the global accuracy, and each client's peak RSS.

The model is the accuracy benchmark's small ViT (pipelines/cifar5_pretrain.toml), fine-tuned on
the CIFAR-10 classes 5-9 of ../shared/data/cifar10_subset.npz by 4 simulated Flower clients
(IID and Dirichlet 0.5). With ``--source random`` the same architecture is randomly initialised
instead: the bytes per round depend only on the tensor shapes, so they are exact, but the
accuracies are then meaningless (the JSON says so).

    PYTHONPATH=$PWD nice -n 10 python benchmarks/federated.py --source random --rounds 1 \
        --max-steps 1 --partitions iid          # bytes per round and RSS only (what ran here)
    PYTHONPATH=$PWD python benchmarks/federated.py --rounds 12 --max-steps 5 --server-lr 4 \
        --centralized --central-epochs 3          # bytes, 12 rounds of 5 local steps
    PYTHONPATH=$PWD python benchmarks/federated.py --batch-size 16 --rounds 234 \
        --max-steps 1 --lr 0.2 --server-lr 1 --partitions iid --methods wasi --centralized \
        --central-lrs 0.05,0.1,0.2 --central-batch-size 64 --central-epochs 3
        # accuracy: as many rounds as centralized steps, each averaging the centralized batch
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10_subset.npz"
ARCH = {
    "random_init": True,
    "arch": "vit_tiny_patch16_224",
    "img_size": 32,
    "seed": 0,
    "model_kwargs": {"patch_size": 4, "embed_dim": 128, "depth": 6, "num_heads": 4},
}
METHODS = {
    "wasi": {"method": "wasi"},
    "vanilla": {"method": "vanilla"},
}  # the accuracy benchmark recipe


def sources(kind: str, runs: Path) -> dict[str, Path]:
    """The starting artifacts: the dense model (vanilla) and its rank-1/4 factoring (wasi)."""
    from wasi_tool.models.loading import ModelSource
    from wasi_tool.stages.compress import CompressConfig, run_compress

    if kind == "random":
        dense = ModelSource(**ARCH)  # type: ignore[arg-type]
    else:
        from benchmarks.accuracy import pretrained

        dense = ModelSource(checkpoint=pretrained(runs))
    factored = runs / "federated" / f"start-{kind}-r0.25"
    if not (factored / "manifest.json").is_file():
        run_compress(dense, CompressConfig(targets="all", rank_ratio=0.25), factored)
    dense_path = runs / "federated" / f"start-{kind}-dense"
    if not (dense_path / "manifest.json").is_file():
        from wasi_tool.stages.finetune import run_finetune
        from wasi_tool.training.config import FinetuneConfig

        # an artifact of the dense model (one step at a negligible lr: 0 is refused)
        run_finetune(
            dense,
            str(DATA),
            FinetuneConfig(
                method="vanilla",
                epochs=1,
                max_steps=1,
                lr=1e-12,
                lr_min=1e-12,
                classes=[0, 1, 2, 3, 4],
            ),
            dense_path,
        )
    return {"wasi": factored, "vanilla": dense_path}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", choices=["pretrained", "random"], default="pretrained")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None, help="cap local steps per epoch")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="training and partition seed")
    ap.add_argument("--lr", type=float, default=0.05, help="the clients' lr (cosine to 0.0005)")
    ap.add_argument("--partitions", default="iid,dirichlet:0.5")
    ap.add_argument("--methods", default="wasi,vanilla", help="comma-separated: wasi, vanilla")
    ap.add_argument(
        "--server-lr",
        type=float,
        default=1.0,
        help="the server's step on the mean update (1: FedAvg; the number of clients: about "
        "the progress of the same samples trained centrally, IID)",
    )
    ap.add_argument(
        "--centralized",
        action="store_true",
        help="also fine-tune wasi centrally from the same start for rounds x local epochs "
        "(the accuracy baseline: global accuracy within 2 points of it, IID)",
    )
    ap.add_argument(
        "--central-lrs",
        default=None,
        help="comma-separated lrs of centralized runs (default: --lr); the federated run's "
        "effective lr is about lr x server-lr / clients, so give that one too",
    )
    ap.add_argument(
        "--central-batch-size",
        type=int,
        default=None,
        help="batch size of the centralized runs (default: --batch-size); e.g. 64 against 4 "
        "clients of batch 16, whose one-step rounds then average a batch of 64",
    )
    ap.add_argument(
        "--central-epochs",
        type=int,
        default=None,
        help="epochs of the centralized run over all the clients' data, uncapped (default: "
        "rounds x local epochs; with --max-steps each client sees rounds x max-steps batches, "
        "so give the epochs that match, e.g. 3 for 12 rounds of 5 steps of a 20-step client "
        "epoch)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "federated.json")
    args = ap.parse_args()

    from wasi_tool.federated import FederateConfig, run_federate

    starts = sources(args.source, args.runs)
    results: list[dict[str, Any]] = []
    methods = {m: METHODS[m] for m in args.methods.split(",")}
    for partition in args.partitions.split(","):
        for name, flags in methods.items():
            config = FederateConfig(
                **flags, targets="all", clients=args.clients, partition=partition,
                rounds=args.rounds, epochs=args.local_epochs, max_steps=args.max_steps,
                batch_size=args.batch_size, classes=[5, 6, 7, 8, 9], lr=args.lr, lr_min=0.0005,
                server_lr=args.server_lr, seed=args.seed,
            )  # fmt: skip
            out = args.runs / "federated" / f"{name}-{partition.replace(':', '')}"
            t0 = time.perf_counter()
            run = run_federate(starts[name], str(DATA), config, out, overwrite=True)
            rows = run.history
            per_round = [
                {
                    "round": r["round"],
                    "bytes_down": sum(c.get("bytes_down", 0) for c in r["clients"]),
                    "bytes_up": sum(c.get("bytes_up", 0) for c in r["clients"]),
                    "test_accuracy": r["test_accuracy"],
                    "peak_rss_bytes": [c.get("peak_rss_bytes") for c in r["clients"]],
                }
                for r in rows
            ]
            entry = {
                "method": name,
                "partition": partition,
                "bytes_per_round": per_round[-1]["bytes_down"] + per_round[-1]["bytes_up"],
                "bytes_per_client_up": rows[-1]["clients"][0].get("bytes_up"),
                "final_accuracy": rows[-1]["test_accuracy"],
                "max_client_peak_rss_bytes": max(
                    c.get("peak_rss_bytes", 0) for r in rows for c in r["clients"]
                ),
                "rounds": per_round,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            results.append(entry)
            print(json.dumps({k: v for k, v in entry.items() if k != "rounds"}), flush=True)
    ratios = {}
    for partition in args.partitions.split(","):
        by = {e["method"]: e for e in results if e["partition"] == partition}
        if {"vanilla", "wasi"} <= set(by):
            ratios[partition] = round(
                by["vanilla"]["bytes_per_round"] / by["wasi"]["bytes_per_round"], 3
            )
    centralized: list[dict[str, Any]] = []
    if args.centralized:  # the same start, data and recipe, one process, rounds x local epochs
        from wasi_tool.models.loading import ModelSource
        from wasi_tool.stages.finetune import run_finetune
        from wasi_tool.training.config import FinetuneConfig

        epochs = args.central_epochs or args.rounds * args.local_epochs
        capped = None if args.central_epochs else args.max_steps
        lrs = [float(x) for x in (args.central_lrs or str(args.lr)).split(",")]
        for lr in lrs:
            t0 = time.perf_counter()
            central_out = args.runs / "federated" / f"wasi-centralized-lr{lr:g}"
            central = FinetuneConfig(
                method="wasi", targets="all", epochs=epochs, max_steps=capped,
                batch_size=args.central_batch_size or args.batch_size,
                classes=[5, 6, 7, 8, 9], lr=lr, lr_min=0.0005, seed=args.seed,
            )  # fmt: skip
            run_finetune(
                ModelSource(checkpoint=starts["wasi"]),
                str(DATA),
                central,
                central_out,
                overwrite=True,
            )
            metrics = json.loads((central_out / "metrics.json").read_text())
            row = {
                "method": "wasi",
                "epochs": epochs,
                "lr": lr,
                "batch_size": central.batch_size,
                "test_accuracy_by_epoch": [e["test_accuracy"] for e in metrics["epochs"]],
                "test_accuracy": metrics["epochs"][-1]["test_accuracy"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
            centralized.append(row)
            print("centralized wasi:", json.dumps(row), flush=True)
        same = next((c for c in centralized if c["lr"] == args.lr), centralized[0])
        for e in results:
            if e["method"] == "wasi":
                e["points_vs_centralized"] = round(
                    100 * (e["final_accuracy"] - same["test_accuracy"]), 2
                )
    report = {
        "source": args.source,
        "note": "accuracies meaningless with a random-init source; bytes are exact"
        if args.source == "random"
        else "",
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": f"{platform.machine()}, shared, nice -n 10",
        "bytes_ratio_vanilla_over_wasi": ratios,
        "centralized": centralized,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("bytes per round, dense FedAvg / wasi:", ratios)


if __name__ == "__main__":
    main()
