"""Settings of the model-level baselines, shared by finetune and the training bench."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from wasi_tool.errors import WasiToolError
from wasi_tool.methods.mezo import MezoOptions
from wasi_tool.nn.token_drop import check_keep_rate


@dataclass
class BaselineOptions(MezoOptions):
    """bsr / bsr+wasi: ``bsr_blocks`` (trained blocks; default 3, 7, 11 scaled to the depth),
    ``drop_at`` (blocks that drop tokens; default 3, 6, 9 scaled), ``keep_rate`` (share of patch
    tokens kept), ``fuse`` (fuse the dropped tokens into one, or discard them); lora:
    ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``lora_recompute`` (memory-exact LoRA:
    recompute x A^T in backward instead of saving it; same gradients); lora-fa:
    ``lora_fa_projection`` (B's gradient projected by (r / alpha)^2 (A A^T)^-1, as LoRA-FA's
    optimiser; off by default: plain SGD on B, see docs/methods-baselines.md). A method's own
    settings are a dataclass in its module, mixed in here (mezo: ``MezoOptions``), so finetune, the
    bench and prepare get them without knowing the method."""

    bsr_blocks: list[int] | None = None
    drop_at: list[int] | None = None
    keep_rate: float = 0.5
    fuse: bool = True
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_recompute: bool = False
    lora_fa_projection: bool = False

    def check_baselines(self) -> None:
        """Validate (and normalise) the baseline settings, once for every config."""
        for name in ("bsr_blocks", "drop_at"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, [int(v) for v in value])
        self.keep_rate = check_keep_rate(self.keep_rate)
        if int(self.lora_rank) < 1:
            raise WasiToolError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise WasiToolError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        self.check_mezo()

    def baseline_options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(BaselineOptions)}
