"""Training checkpoints: one file, written atomically, read back only with weights_only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from wasi_tool.errors import WasiToolError

FILE = "last.pt"


def checkpoint_dir(out: Path) -> Path:
    """Where a run writing ``out`` keeps its checkpoint: ``<out>.ckpt/`` beside it."""
    return out.parent / f"{out.name}.ckpt"


def save(directory: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``directory/last.pt`` atomically (a crash leaves the old file)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(directory: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint in ``directory``, refused unless its ``identity`` entries (the config
    and data it was made with) equal the given ones."""
    path = directory / FILE
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WasiToolError(f"nothing to resume: no checkpoint at {path}") from None
    except Exception as exc:  # a truncated or foreign file
        raise WasiToolError(f"cannot read checkpoint {path}: {exc}") from None
    if any(state.get(k) != v for k, v in identity.items()):
        raise WasiToolError(
            f"checkpoint {path} was made with other settings or data; resume with the same "
            "command, or start again with --overwrite"
        )
    return state
