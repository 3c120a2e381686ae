"""Checking a user's example input against their model before anything changes the model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wasi_tool.errors import WasiToolError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_example_input(model: nn.Module, example_input: Any) -> None:
    """Raise a one-line WasiToolError naming ``example_input`` unless it is one tensor batch
    that ``model`` runs on: one forward pass without gradients, in eval mode (no batch-norm
    statistics move, no dropout), on the model as it is. Called before a function that
    changes the model in place (``wasi_tool.prepare``), so a wrong shape is refused while
    the model is still untouched. The model's train/eval mode is restored."""
    if not isinstance(example_input, torch.Tensor):
        raise WasiToolError(
            f"example_input must be a tensor (one input batch), got {type(example_input).__name__}"
        )
    if example_input.dim() == 0 or example_input.shape[0] < 1:
        raise WasiToolError(
            f"example_input must be a batch (a leading batch dimension of at least 1), got "
            f"shape {tuple(example_input.shape)}"
        )
    if example_input.is_floating_point() and not bool(torch.isfinite(example_input).all()):
        raise WasiToolError("example_input holds NaN or infinite values")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    except Exception as exc:  # a shape the model does not take, a dtype it cannot use, ...
        raise WasiToolError(
            f"example_input of shape {tuple(example_input.shape)} and dtype "
            f"{str(example_input.dtype).removeprefix('torch.')} does not run through the model "
            f"({type(exc).__name__}: {_first_line(exc)[:200]}); the model was not changed"
        ) from None
    finally:
        model.train(was_training)
