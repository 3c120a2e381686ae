"""What the training loop reports; the CLI renders it, the library never prints."""

from __future__ import annotations

from typing import Protocol

from wasi_tool.training.results import EpochRecord


class Progress(Protocol):
    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...

    def step(self, loss: float, accuracy: float, images_per_second: float) -> None: ...

    def end_epoch(self, record: EpochRecord) -> None: ...

    def note(self, message: str) -> None: ...


class Silent:
    """A Progress that reports nothing (library use, tests)."""

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def step(self, loss: float, accuracy: float, images_per_second: float) -> None:
        pass

    def end_epoch(self, record: EpochRecord) -> None:
        pass

    def note(self, message: str) -> None:
        pass
