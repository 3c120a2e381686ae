"""PNG plots of stage reports (matplotlib, headless).

Each plot shows what differs (ranks in absolute K, per layer, against the break-even rank; a
task's loss and accuracy per epoch; the whole training step beside the targets' share) and
labels its values, so a person reading it does not have to guess from bar heights.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from wasi_tool.models.families.base import numbered_block
from wasi_tool.ops.rank import breakeven_rank


class _EnergyLayer(Protocol):
    name: str
    out_features: int
    in_features: int
    rank: int
    full_rank: int
    status: str
    curve: list[float]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _split(name: str) -> tuple[str, str]:
    """("blocks.3.mlp.fc1") -> ("3", "mlp.fc1"): the block's number and the layer kind within
    it; the block as the model families name it without a model (``numbered_block``)."""
    block = numbered_block(name)
    if block is None or block == name:
        return name, name.rsplit(".", 1)[-1]
    number = re.search(r"\d+$", block)
    return (number.group(0) if number else block), name[len(block) + 1 :]


def _who(name: str, method: str) -> str:
    """A stage's legend label: its name, and its method when the name does not say it."""
    return name if method in name else f"{name} ({method})"


def _by_kind(layers: Sequence[Any], get: Any) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = defaultdict(list)
    for layer in layers:
        groups[_split(get(layer, "name"))[1]].append(layer)
    return groups


def _attr(obj: Any, key: str) -> Any:
    return obj[key] if isinstance(obj, Mapping) else getattr(obj, key)


def _line_value(layer: Any, what: str) -> float:
    if what == "full rank":
        return float(_attr(layer, "full_rank"))
    return breakeven_rank(_attr(layer, "out_features"), _attr(layer, "in_features"))


def _rank_panel(ax: Any, layers: Sequence[Any], eps: float | None) -> None:
    """Rank K per layer (absolute), one series per layer kind, with each kind's break-even
    rank O*I/(O+I) (below it the factored layer saves parameters and FLOPs) and full rank."""
    groups = _by_kind(layers, _attr)
    width = 0.8 / max(1, len(groups))
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"]
    blocks: list[str] = list(dict.fromkeys(_split(_attr(r, "name"))[0] for r in layers))
    label_values = len(layers) <= 48
    drawn: set[tuple[str, int]] = set()
    for g, (kind, members) in enumerate(groups.items()):
        colour = colours[g % len(colours)]
        xs = [blocks.index(_split(_attr(r, "name"))[0]) + (g - (len(groups) - 1) / 2) * width
              for r in members]  # fmt: skip
        ks = [_attr(r, "rank") for r in members]
        dense = [_attr(r, "status") != "factored" for r in members]
        bars = ax.bar(xs, ks, width=width * 0.95, color=colour, label=f"{kind}: rank K")
        for bar, d in zip(bars, dense, strict=True):
            if d:
                bar.set_hatch("//")
                bar.set_alpha(0.5)
        if label_values:
            for x, k in zip(xs, ks, strict=True):
                ax.text(x, k, str(k), ha="center", va="bottom", fontsize=6, rotation=90)
        first = members[0]
        be = breakeven_rank(_attr(first, "out_features"), _attr(first, "in_features"))
        full = _attr(first, "full_rank")
        for value, style, what in ((be, "--", "break-even"), (full, ":", "full rank")):
            key = (what, round(value))
            if key in drawn:  # the same line for another kind: one line, one label
                continue
            drawn.add(key)
            same = [k for k, ms in groups.items()
                    if round(_line_value(ms[0], what)) == round(value)]  # fmt: skip
            who = "all" if len(same) == len(groups) else ", ".join(same)
            ax.axhline(value, color="black" if who == "all" else colour, ls=style, lw=1.2,
                       label=f"{what} {value:.0f} ({who})")  # fmt: skip
    ax.set_xticks(range(len(blocks)), blocks, fontsize=8)
    ax.set_xlabel("block")
    ax.set_ylabel("rank K (absolute)")
    ax.set_ylim(0, max(_attr(r, "full_rank") for r in layers) * 1.45)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(
        "rank per layer" + (f" at eps {eps:g}" if eps is not None else "")
        + " (hatched: left dense)",
        fontsize=9,
    )  # fmt: skip


def plot_energy(
    layers: Sequence[_EnergyLayer],
    eps: float | None,
    path: Path,
    relative_to: str | None = None,
) -> Path:
    """What eps chose, per layer: the rank K each layer kept (absolute) against its break-even
    rank, and the energy curves as the range over layers of a kind (min-max band, median line)
    in absolute K, with where the cuts fall. ``relative_to``: the input was already compressed
    (a re-compress), so the energy is of that artifact's weights; the title says so."""
    plt = _pyplot()
    groups = _by_kind(layers, getattr)
    fig, axes = plt.subplots(
        1, 1 + len(groups), figsize=(6.5 + 3.8 * len(groups), 4.2), squeeze=False
    )
    _rank_panel(axes[0][0], layers, eps)
    for ax, (kind, members) in zip(axes[0][1:], groups.items(), strict=True):
        n = min(len(m.curve) for m in members)
        ks = list(range(1, n + 1))
        cols = [sorted(m.curve[i] for m in members) for i in range(n)]
        lo, hi = [c[0] for c in cols], [c[-1] for c in cols]
        mid = [c[len(c) // 2] for c in cols]
        ax.fill_between(ks, lo, hi, color="tab:blue", alpha=0.25, label="min-max over layers")
        ax.plot(ks, mid, color="tab:blue", lw=1.2, label="median layer")
        cuts = [m.rank for m in members]
        ax.axvspan(min(cuts), max(cuts) + 0.5, color="tab:green", alpha=0.25,
                   label=f"chosen K {min(cuts)}-{max(cuts)}")  # fmt: skip
        first = members[0]
        be = breakeven_rank(first.out_features, first.in_features)
        ax.axvline(be, color="grey", ls="--", lw=1, label=f"break-even K {be:.0f}")
        if eps is not None:
            ax.axhline(eps, color="crimson", ls="--", lw=1, label=f"eps = {eps:g}")
        ax.set_title(
            f"{kind}: {len(members)} layers, {first.out_features}x{first.in_features}", fontsize=9
        )
        ax.set_xlabel("rank K")
        ax.set_ylabel("energy kept (cumulative)")
        ax.set_xlim(0, first.full_rank)
        ax.set_ylim(0, 1.01)
        ax.legend(loc="lower right", fontsize=7)
        ax.grid(alpha=0.3)
    title = "Compression: the rank each layer kept and the singular-value energy behind it"
    if relative_to:
        title += f"\nenergy is relative to the input artifact ({relative_to}), not the original"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ranks(
    layers: Sequence[Mapping[str, Any]], eps: float | None, title: str, path: Path
) -> Path:
    """Rank K per layer in absolute terms, its break-even and full rank, eps in the title."""
    plt = _pyplot()
    blocks = len({_split(str(r["name"]))[0] for r in layers})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * blocks + 3), 4.0))
    _rank_panel(ax, layers, eps)
    factored = sum(r["status"] == "factored" for r in layers)
    ax.set_title(f"{title}: {factored} of {len(layers)} layers factored"
                 + (f", eps {eps:g}" if eps is not None else ""), fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training(runs: Sequence[tuple[str, Any]], path: Path) -> Path:
    """Loss (top) and accuracy (bottom) per epoch, one column per task (data and classes):
    the methods that trained the same task share a panel; solid test, dashed train."""
    plt = _pyplot()
    tasks: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for name, m in runs:
        classes = ",".join(m.classes) if len(m.classes) <= 10 else f"{len(m.classes)} classes"
        data = Path(str(m.data)).name
        tasks[data if classes in data else f"{data} [{classes}]"].append((name, m))
    fig, axes = plt.subplots(
        2, len(tasks), figsize=(4.6 * len(tasks), 6.0), squeeze=False, sharex="col"
    )
    for col, (task, members) in enumerate(tasks.items()):
        loss_ax, acc_ax = axes[0][col], axes[1][col]
        for i, (name, m) in enumerate(members):
            colour = f"C{i}"
            ep = [e.epoch for e in m.epochs]
            loss_ax.plot(ep, [e.test_loss for e in m.epochs], "o-", color=colour,
                         label=f"{_who(name, m.method)} test")  # fmt: skip
            loss_ax.plot(ep, [e.train_loss for e in m.epochs], "s--", color=colour, alpha=0.6,
                         label=f"{name} train")  # fmt: skip
            acc_ax.plot(ep, [e.test_accuracy for e in m.epochs], "o-", color=colour,
                        label=f"{name} test")  # fmt: skip
            acc_ax.plot(ep, [e.train_accuracy for e in m.epochs], "s--", color=colour,
                        alpha=0.6, label=f"{name} train")  # fmt: skip
            if m.epochs:
                last = m.epochs[-1]
                acc_ax.annotate(f"{last.test_accuracy:.3f}", (last.epoch, last.test_accuracy),
                                textcoords="offset points", xytext=(4, 4 - 10 * i),
                                fontsize=7, color=colour)  # fmt: skip
        loss_ax.set_title(task, fontsize=9)
        loss_ax.set_ylabel("loss")
        acc_ax.set_ylabel("accuracy")
        acc_ax.set_xlabel("epoch")
        acc_ax.xaxis.get_major_locator().set_params(integer=True)
        for ax in (loss_ax, acc_ax):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle("Training curves per task (solid: test, dashed: train)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _labelled_bars(ax: Any, names: list[str], values: list[float], fmt: str, **kw: Any) -> None:
    bars = ax.bar(names, values, **kw)
    for bar, v in zip(bars, values, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), fmt.format(v),
                ha="center", va="bottom", fontsize=7)  # fmt: skip
    ax.tick_params(axis="x", labelsize=7, rotation=20)


def plot_memory_accuracy(
    runs: Sequence[tuple[str, Any]],
    peaks: Mapping[str, tuple[float, float | None, str]],
    path: Path,
) -> Path:
    """Test accuracy, the bytes a training step saves for backward (the whole model beside
    the targets' share) and the whole process's peak memory per method, every bar labelled.
    ``peaks``: method -> (peak RSS, library floor or None, where it was measured)."""
    plt = _pyplot()
    n = 3 if peaks else 2
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 3.8))
    names = [n_ for n_, _ in runs]
    accs = [m.final.test_accuracy if m.final else 0.0 for _, m in runs]
    _labelled_bars(axes[0], names, accs, "{:.4f}", color="tab:green")
    axes[0].set_ylim(0, 1.1)
    axes[0].set_title("test accuracy (fine-tune stage)", fontsize=9)
    whole = [(m.measured.saved_bytes_per_step.total or 0) / 1e6 for _, m in runs]
    targets = [(m.measured.saved_bytes_per_step.targets or 0) / 1e6 for _, m in runs]
    xs = range(len(names))
    a = axes[1]
    w = 0.4
    for off, vals, label, colour in ((-w / 2, whole, "whole model", "tab:grey"),
                                     (w / 2, targets, "in the targets", "tab:blue")):  # fmt: skip
        bars = a.bar([x + off for x in xs], vals, width=w, label=label, color=colour)
        for bar, v in zip(bars, vals, strict=True):
            a.text(bar.get_x() + w / 2, bar.get_height(), f"{v:.1f}", ha="center",
                   va="bottom", fontsize=7)  # fmt: skip
    a.set_xticks(list(xs), names, fontsize=7, rotation=20)
    a.set_title("saved for backward per step (MB)", fontsize=9)
    a.legend(fontsize=7)
    if peaks:
        ax = axes[2]
        methods = list(peaks)
        peak = [peaks[k][0] / 1e6 for k in methods]
        floor = [(peaks[k][1] or 0) / 1e6 for k in methods]
        ax.bar(methods, floor, color="lightgrey", label="library floor")
        above = [p - f for p, f in zip(peak, floor, strict=True)]
        bars = ax.bar(methods, above, bottom=floor, color="tab:orange", label="above the floor")
        for bar, p, f in zip(bars, peak, floor, strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, p,
                    f"{p:.0f}" + (f"\n(+{p - f:.0f})" if f else ""), ha="center",
                    va="bottom", fontsize=7)  # fmt: skip
        ax.set_ylim(0, max(peak) * 1.25)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        where = next(iter(peaks.values()))[2]
        ax.set_title(f"peak RSS of a training step (MB)\n{where}", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Accuracy and memory: the whole step, not only the targets", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
