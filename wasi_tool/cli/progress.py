"""Rendering the training loop's progress reports with rich (finetune and run share it)."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from wasi_tool.cli.common import console
from wasi_tool.training.results import EpochRecord

_STEP_FIELDS = (
    "loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}  {task.fields[ips]:.0f} img/s"
)


class RichProgress:
    """Renders the training loop's reports with a rich progress bar per epoch."""

    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(_STEP_FIELDS),
            TimeElapsedColumn(),
            console=console,
        )
        self.task: Any = None

    def __enter__(self) -> RichProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.task = self.bar.add_task(
            "train", total=steps, epoch=f"{epoch + 1}/{epochs}", loss=0.0, acc=0.0, ips=0.0
        )

    def step(self, loss: float, accuracy: float, images_per_second: float) -> None:
        self.bar.update(self.task, advance=1, loss=loss, acc=accuracy, ips=images_per_second)

    def end_epoch(self, record: EpochRecord) -> None:
        self.bar.console.print(
            f"epoch {record.epoch}: train loss {record.train_loss:.4f} acc "
            f"{record.train_accuracy:.3f} | test loss {record.test_loss:.4f} acc "
            f"{record.test_accuracy:.3f} | {record.seconds:.1f} s"
        )

    def note(self, message: str) -> None:
        self.bar.console.print(f"[dim]{message}[/dim]")
