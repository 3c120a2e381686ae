"""The report's plots: each is drawn from the records it should show, and says what it shows
(absolute ranks against the break-even rank, a panel per task, the whole step's memory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from wasi_tool.plots import _split, plot_memory_accuracy, plot_ranks, plot_training
from wasi_tool.training.results import EpochRecord, FinetuneMetrics, Measured, SavedBytes

pytest.importorskip("matplotlib")


def _layers() -> list[dict[str, Any]]:
    return [
        {"name": f"blocks.{b}.mlp.{k}", "out_features": o, "in_features": i, "rank": 100 + b,
         "full_rank": 192, "status": "factored" if b < 3 else "dense: no saving"}
        for b in range(4)
        for k, o, i in (("fc1", 768, 192), ("fc2", 192, 768))
    ]  # fmt: skip


def _metrics(method: str, data: str, acc: float) -> FinetuneMetrics:
    return FinetuneMetrics(
        method=method, config={}, data=data, classes=["5", "6"], targets=[], weight_ranks={},
        act_ranks={}, act_calibration=None,
        epochs=[EpochRecord(e, 1.0 / e, acc - 0.1, 1.2 / e, acc, 0.1, 1.0) for e in (1, 2)],
        measured=Measured(0.1, 100.0, 4, 10**9, SavedBytes(2e7, 1e6)), analytic={},
    )  # fmt: skip


def test_layer_names_split_into_block_and_kind() -> None:
    assert _split("blocks.3.mlp.fc1") == ("3", "mlp.fc1")
    assert _split("encoder.layer.10.attention.output.dense") == ("10", "attention.output.dense")
    assert _split("head") == ("head", "head")


def test_plots_are_written(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    seen: list[str] = []
    real = plt.Axes.axhline

    def spy(self: Any, y: float = 0, *a: Any, **kw: Any) -> Any:
        seen.append(str(kw.get("label")))
        return real(self, y, *a, **kw)

    plt.Axes.axhline = spy  # type: ignore[method-assign]
    try:
        plot_ranks(_layers(), 0.8, "rank per layer", tmp_path / "ranks.png")
    finally:
        plt.Axes.axhline = real  # type: ignore[method-assign]
    assert "break-even 154 (all)" in seen and "full rank 192 (all)" in seen  # one line each
    runs = [
        ("pretrain", _metrics("vanilla", "digits 0-4", 0.9)),
        ("wasi", _metrics("wasi", "digits 5-9", 0.89)),
        ("vanilla", _metrics("vanilla", "digits 5-9", 0.92)),
    ]
    plot_training(runs, tmp_path / "training.png")
    plot_memory_accuracy(
        runs[1:], {"wasi": (8e8, 7e8, "bench"), "vanilla": (9e8, 7e8, "bench")},
        tmp_path / "memory.png",
    )  # fmt: skip
    for name in ("ranks.png", "training.png", "memory.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
