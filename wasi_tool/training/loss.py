"""The training loss of every task: a classifier's, and a causal LM's next-token loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # a label that takes no part in the loss (padding, prompt tokens)


def task_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of a classifier's (B, C) logits against (B,) labels, or of a causal LM's
    (B, T, V) logits against (B, T) next-token labels (already shifted: ``y[:, t]`` is the
    token that follows position t), where ``IGNORE`` labels are left out of the mean."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        y.reshape(-1),
        ignore_index=IGNORE,
        reduction=reduction,
    )


def count_correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(correct, counted): top-1 hits over the labels that are not ``IGNORE``."""
    keep = y != IGNORE
    return int(((logits.argmax(-1) == y) & keep).sum()), int(keep.sum())


__all__ = ["IGNORE", "count_correct", "task_loss"]
