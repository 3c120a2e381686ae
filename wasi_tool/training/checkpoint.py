"""Training checkpoints: ``last.pt`` written atomically, and beside it ``last.json``, which
holds the file's sha256 and the fingerprint of the run that wrote it (arch, config, data,
every state-dict entry's name and shape). ``load`` is the one verifier: the fingerprint and
the hash are checked before ``torch.load`` (weights_only) is trusted, and the loaded state's
structure after it; each refusal is one line naming what did not match."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, TypedDict, cast

import torch

from wasi_tool.errors import WasiToolError
from wasi_tool.safe_read import read_json

FILE = "last.pt"
SIDECAR = "last.json"
FORMAT = 1
# what a resumable state holds (Trainer._state); anything else is not one of ours
KEYS = (
    "epoch", "step", "partial", "model", "optimizer", "scheduler", "torch_rng", "history",
    "step_times", "saved_total", "saved_targets", "act_shapes",
)  # fmt: skip


class RunIdentity(TypedDict, total=False):
    """What a checkpoint must match to be resumed by a run: its arch, its stage config (as
    ``to_dict`` gives it) and its data source (none: a run that never resumes, e.g. a
    federated participant's local epochs)."""

    arch: str | None
    config: dict[str, Any]
    data: str


class Fingerprint(RunIdentity):
    """``RunIdentity`` and the name and shape of every state-dict entry (None: extra state)."""

    state: dict[str, list[int] | None]


class TrainingState(RunIdentity):
    """What ``last.pt`` holds (``Trainer._state``; ``KEYS`` and the identity)."""

    epoch: int
    step: int
    partial: list[float]  # that epoch's loss sum, correct count, samples seen, seconds so far
    model: dict[str, object]
    optimizer: dict[str, object]
    scheduler: dict[str, object]
    torch_rng: torch.Tensor
    history: list[dict[str, Any]]  # EpochRecord fields
    step_times: list[float]
    saved_total: list[int]
    saved_targets: list[int]
    act_shapes: dict[str, list[int]]


def checkpoint_dir(out: Path) -> Path:
    """Where a run writing ``out`` keeps its checkpoint: ``<out>.ckpt/`` beside it."""
    return out.parent / f"{out.name}.ckpt"


def is_checkpoint_dir(directory: Path) -> bool:
    """Whether ``directory`` is a checkpoint folder this tool wrote: a real directory (not a
    link) holding only last.pt, last.json and their temporaries."""
    if directory.is_symlink() or not directory.is_dir():
        return False
    ours = {FILE, SIDECAR, f".{FILE}.tmp", f".{SIDECAR}.tmp"}
    return all(p.name in ours and not p.is_symlink() for p in directory.iterdir())


def remove_checkpoint_dir(directory: Path) -> None:
    """Delete a checkpoint folder (``--overwrite``), refusing anything that is not one."""
    if not directory.exists() and not directory.is_symlink():
        return
    if not is_checkpoint_dir(directory):
        raise WasiToolError(
            f"{directory} is not a wasi-tool checkpoint (it holds other files, or is a link or "
            "a file); refusing to delete it: move it away"
        )
    shutil.rmtree(directory)


def fingerprint(model: torch.nn.Module, identity: RunIdentity) -> Fingerprint:
    """What a checkpoint must match to be resumed by this run: ``identity`` (arch, config,
    data) and the name and shape of every state-dict entry (None: extra state)."""
    shapes = {
        name: list(value.shape) if isinstance(value, torch.Tensor) else None
        for name, value in model.state_dict().items()
    }
    plain = json.loads(json.dumps(dict(identity), default=str))  # as the sidecar reads back
    return cast(Fingerprint, {**plain, "state": shapes})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write(path: Path, write: Any) -> Path:
    """Write to a temp file beside ``path`` (fsynced), removed again on any failure."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise WasiToolError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
        raise
    return tmp


def save(directory: Path, state: TrainingState, print_: Fingerprint) -> None:
    """Write ``state`` to ``directory/last.pt`` and its hash and fingerprint ``print_`` to
    ``last.json``, both atomically. The sidecar goes first and accepts the previous file's
    hash too, so a crash between the two renames leaves a pair that still verifies."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WasiToolError(f"cannot create {directory}: {exc.strerror or exc}") from None
    path, side = directory / FILE, directory / SIDECAR
    tmp = _write(path, lambda fh: torch.save(state, fh))
    accepted = [_sha256(tmp)]
    if path.is_file() and side.is_file():
        with contextlib.suppress(WasiToolError, TypeError, KeyError):
            previous = read_json(side)["sha256"]  # one of them is the file on disk until the
            accepted += [h for h in previous[:2] if isinstance(h, str)]  # rename below
    record = {"format": FORMAT, "sha256": accepted, "fingerprint": dict(print_)}
    try:
        side_tmp = _write(side, lambda fh: fh.write(json.dumps(record).encode()))
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.replace(side_tmp, side)
    os.replace(tmp, path)


def _names(keys: list[str], limit: int = 3) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_fingerprint(path: Path, saved: object, expected: Fingerprint) -> None:
    if not isinstance(saved, dict):
        raise WasiToolError(f"checkpoint {path} has no fingerprint in {SIDECAR}")
    if saved.get("arch") != expected.get("arch"):
        raise WasiToolError(
            f"checkpoint {path} is for arch {saved.get('arch')}, this run is "
            f"{expected.get('arch')}; start again with --overwrite"
        )
    if any(saved.get(k) != v for k, v in expected.items() if k not in ("arch", "state")):
        raise WasiToolError(
            f"checkpoint {path} was made with other settings or data; resume with the same "
            "command, or start again with --overwrite"
        )
    have, want = saved.get("state"), expected["state"]
    if not isinstance(have, dict):
        raise WasiToolError(f"checkpoint {path}: its fingerprint lists no model state")
    missing = [k for k in want if k not in have]
    if missing:
        raise WasiToolError(
            f"checkpoint {path} does not fit this model: missing keys {_names(missing)}"
        )
    unexpected = [k for k in have if k not in want]
    if unexpected:
        raise WasiToolError(
            f"checkpoint {path} does not fit this model: unexpected keys {_names(unexpected)}"
        )
    shapes = [f"{k} {have[k]} vs {want[k]}" for k in want if have[k] != want[k]]
    if shapes:
        raise WasiToolError(f"checkpoint {path} does not fit this model: shape of {_names(shapes)}")


def load(directory: Path, expected: Fingerprint) -> TrainingState:
    """The checkpoint in ``directory``, verified against ``expected`` (a ``fingerprint``):
    the sidecar's fingerprint, then the file's sha256, then (after a weights_only load) the
    state's structure."""
    path, side = directory / FILE, directory / SIDECAR
    if not path.is_file():
        raise WasiToolError(f"nothing to resume: no checkpoint at {path}")
    if not side.is_file():
        raise WasiToolError(
            f"checkpoint {path} has no {SIDECAR} beside it (hash and fingerprint): cannot "
            "verify it; start again with --overwrite"
        )
    record = read_json(side, f"checkpoint sidecar {side}", max_bytes=16 * 1024 * 1024)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise WasiToolError(f"checkpoint sidecar {side} is not one this wasi-tool writes")
    _check_fingerprint(path, record.get("fingerprint"), expected)
    accepted = record.get("sha256")
    if not isinstance(accepted, list) or _sha256(path) not in accepted:
        raise WasiToolError(
            f"checkpoint hash mismatch: {path} is not the file that was saved (corrupt or "
            "changed); start again with --overwrite"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # hash matched, yet unreadable: a foreign pair
        raise WasiToolError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(state, dict):
        raise WasiToolError(f"checkpoint {path} holds a {type(state).__name__}, not a state")
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise WasiToolError(f"checkpoint {path} is missing keys {_names(missing)}")
    if not isinstance(state["model"], dict) or set(state["model"]) != set(expected["state"]):
        raise WasiToolError(f"checkpoint {path}: its model state does not match its fingerprint")
    return cast(TrainingState, state)  # verified: its hash, keys and model entries
