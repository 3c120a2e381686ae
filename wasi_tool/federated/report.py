"""The round history as a PNG: global accuracy, bytes per round, client losses and peak RSS."""

from __future__ import annotations

from pathlib import Path

from wasi_tool.artifact.records import RoundRecord


def plot_history(history: list[RoundRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in history]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    axes[0].plot(rounds, [r["test_accuracy"] for r in history], marker="o")
    axes[0].set(title="global accuracy (server test split)", xlabel="round")
    up = [sum(c.get("bytes_up", 0) for c in r["clients"]) / 2**20 for r in history]
    down = [sum(c.get("bytes_down", 0) for c in r["clients"]) / 2**20 for r in history]
    axes[1].bar([x - 0.2 for x in rounds], down, width=0.4, label="down")
    axes[1].bar([x + 0.2 for x in rounds], up, width=0.4, label="up")
    axes[1].set(title="MiB per round (all clients)", xlabel="round")
    axes[1].legend()
    nodes = sorted({c["node"] for r in history for c in r["clients"]})
    for node in nodes:
        rows = [(r["round"], c) for r in history for c in r["clients"] if c["node"] == node]
        ok = [(x, c) for x, c in rows if c["status"] == "ok"]
        label = f"client {int(ok[0][1].get('partition_id', 0)) if ok else node}"
        axes[2].plot([x for x, _ in ok], [c["train_loss"] for _, c in ok], marker=".", label=label)
        axes[3].plot(
            [x for x, _ in ok],
            [c["peak_rss_bytes"] / 2**20 for _, c in ok],
            marker=".",
            label=label,
        )
    axes[2].set(title="local training loss", xlabel="round")
    axes[3].set(title="client peak RSS (MiB)", xlabel="round")
    for ax in axes[2:]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
