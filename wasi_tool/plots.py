"""PNG plots of stage reports (matplotlib, headless)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from wasi_tool.ops.rank import breakeven_rank


class _EnergyLayer(Protocol):
    name: str
    out_features: int
    in_features: int
    rank: int
    full_rank: int
    status: str
    curve: list[float]


def plot_energy(layers: Sequence[_EnergyLayer], eps: float | None, path: Path) -> Path:
    """Cumulative singular-value energy per layer against rank / min(O, I), with each cut.

    One panel per layer kind (the last part of the module name: fc1, fc2, qkv, ...), one line
    per layer coloured by depth, a dot where the chosen rank cuts the curve, and the eps line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[_EnergyLayer]] = defaultdict(list)
    for layer in layers:
        groups[layer.name.rsplit(".", 1)[-1]].append(layer)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.8), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (kind, members) in zip(axes[0], groups.items(), strict=True):
        for idx, layer in enumerate(members):
            colour = cmap(idx / max(1, len(members) - 1))
            xs = [(k + 1) / layer.full_rank for k in range(len(layer.curve))]
            ax.plot(xs, layer.curve, color=colour, lw=1.0)
            cut = layer.curve[layer.rank - 1]
            marker = "o" if layer.status != "dense: no saving" else "x"
            ax.plot([layer.rank / layer.full_rank], [cut], marker, color=colour, ms=4)
        first = members[0]
        breakeven = breakeven_rank(first.out_features, first.in_features) / first.full_rank
        ax.axvline(breakeven, color="grey", ls=":", lw=1, label="break-even rank")
        if eps is not None:
            ax.axhline(eps, color="crimson", ls="--", lw=1, label=f"eps = {eps:g}")
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{kind} ({len(members)} layers; dark = first)", fontsize=9)
        ax.set_xlabel("rank / min(O, I)")
        ax.set_ylabel("explained variance")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
    fig.suptitle(
        "Singular-value energy and the chosen rank (o factored, x left dense)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
