"""Settings of the model-level baselines, shared by finetune and the training bench."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class BaselineOptions:
    """bsr / bsr+wasi: ``bsr_blocks`` (trained blocks; default 3, 7, 11 scaled to the depth),
    ``drop_at`` (blocks that drop tokens; default 3, 6, 9 scaled), ``keep_rate`` (share of patch
    tokens kept), ``fuse`` (fuse the dropped tokens into one, or discard them); lora:
    ``lora_rank``, ``lora_alpha``, ``lora_dropout``."""

    bsr_blocks: list[int] | None = None
    drop_at: list[int] | None = None
    keep_rate: float = 0.5
    fuse: bool = True
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0

    def baseline_options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(BaselineOptions)}
