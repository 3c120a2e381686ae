"""Rendering the training loop's progress reports (finetune and run share it).

On a terminal: a rich progress bar per epoch. Otherwise (CI logs, ``| tee``): plain lines in
order, one at every tenth of an epoch, so a log shows progress as it happens instead of every
bar dumped at the end. Both show the epoch's running means, labelled as such, so they agree
with the epoch line that follows.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from wasi_tool.cli.common import console

if TYPE_CHECKING:
    from wasi_tool.training.results import EpochRecord

_STEP_FIELDS = (
    "mean so far: loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}  "
    "{task.fields[ips]:.0f} img/s"
)
LINES_PER_EPOCH = 10  # plain lines per epoch when the output is not a terminal


class RichProgress:
    """Renders the training loop's reports: a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, live: bool | None = None) -> None:
        self.live = console.is_terminal if live is None else live
        self.bar = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(_STEP_FIELDS),
            TimeElapsedColumn(),
            console=console,
        )
        self.task: Any = None
        self._epoch = ""
        self._steps = 0
        self._done = 0
        self._loss = 0.0
        self._acc = 0.0
        self._start = 0.0

    def __enter__(self) -> RichProgress:
        if self.live:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.bar.__exit__(None, None, None)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self._epoch, self._steps, self._done = f"{epoch + 1}/{epochs}", steps, 0
        self._loss = self._acc = 0.0
        self._start = time.perf_counter()
        if self.live:
            self.task = self.bar.add_task(
                "train", total=steps, epoch=self._epoch, loss=0.0, acc=0.0, ips=0.0
            )

    def step(self, loss: float, accuracy: float, images_per_second: float) -> None:
        self._done += 1
        self._loss += (loss - self._loss) / self._done  # running means over the epoch
        self._acc += (accuracy - self._acc) / self._done
        if self.live:
            self.bar.update(
                self.task, advance=1, loss=self._loss, acc=self._acc, ips=images_per_second
            )
            return
        every = max(1, -(-self._steps // LINES_PER_EPOCH)) if self._steps else 1
        if self._done % every == 0 or self._done == self._steps:
            console.print(
                f"epoch {self._epoch} step {self._done}/{self._steps or '?'}: mean so far "
                f"loss {self._loss:.4f} acc {self._acc:.3f} | {images_per_second:.0f} img/s | "
                f"{time.perf_counter() - self._start:.0f} s",
                markup=False,
                highlight=False,
            )

    def end_epoch(self, record: EpochRecord) -> None:
        console.print(
            f"epoch {record.epoch}: train loss {record.train_loss:.4f} acc "
            f"{record.train_accuracy:.3f} | test loss {record.test_loss:.4f} acc "
            f"{record.test_accuracy:.3f} | {record.seconds:.1f} s"
        )

    def note(self, message: str) -> None:
        if self.live:
            console.print(f"[dim]{message}[/dim]")
        else:
            console.print(message, markup=False, highlight=False)
