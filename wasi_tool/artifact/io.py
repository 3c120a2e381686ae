"""Reading and writing an artifact directory: weights (safetensors), ``manifest.json`` and
``report.json``, published atomically (``publish.atomic_directory``).

An artifact directory holds ``model.safetensors`` whose ``__metadata__`` (strings only) carries
what is needed to rebuild the module tree (``WeightsMetadata``), and ``manifest.json`` that
says how it was made (``Manifest``). This module does file I/O only; rebuilding models lives
in ``wasi_tool.models``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import shutil
import struct
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from wasi_tool._version import __version__
from wasi_tool.artifact.names import MANIFEST, REPORT, WEIGHTS
from wasi_tool.artifact.publish import atomic_directory, note_input, safe_member
from wasi_tool.artifact.records import (
    FileEntry,
    LayerDict,
    Manifest,
    ModelDict,
    SourceDict,
    WeightsMetadata,
    validate_manifest,
)
from wasi_tool.errors import WasiToolError
from wasi_tool.safe_read import read_json

if TYPE_CHECKING:  # torch loads when weights are read or written, not to name a file
    import torch


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Versions of the software that made an artifact (timm's from its metadata: importing it
    here would bypass models.timm_import)."""
    from importlib import metadata

    import torch

    try:
        timm_version = metadata.version("timm")
    except metadata.PackageNotFoundError:
        timm_version = "not installed"
    return {
        "wasi_tool": __version__,
        "torch": torch.__version__,
        "timm": timm_version,
        "python": platform.python_version(),
    }


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def is_artifact_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and validate ``manifest.json`` of an artifact directory: the JSON as written
    (``load_manifest`` gives the typed ``Manifest``)."""
    path = directory / MANIFEST
    if path.is_symlink():
        raise WasiToolError(f"{path} is a symbolic link; an artifact holds its own files")
    if not path.is_file():
        raise WasiToolError(f"{directory} is not a wasi-tool artifact (no {MANIFEST})")
    try:  # bounded: size before reading, nesting depth before parsing
        manifest = read_json(path, str(path))
    except (FileNotFoundError, NotADirectoryError):
        raise WasiToolError(f"{directory} is not a wasi-tool artifact (no {MANIFEST})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WasiToolError(f"cannot read {path}: {exc}") from None
    validate_manifest(manifest, path)
    note_input(directory)
    return manifest


def load_manifest(directory: Path) -> Manifest:
    """The ``Manifest`` of an artifact directory, read and validated."""
    directory = Path(directory)
    return Manifest.from_dict(read_manifest(directory), directory / MANIFEST)


class FileStatus(TypedDict):
    """A file of an artifact as ``describe`` finds it on disk."""

    bytes: int | None
    sha256: str | None
    status: str  # ok | missing | mismatch | this record


class ArtifactInfo(TypedDict):
    """What ``describe`` says about an artifact (``wasi-tool info --json``)."""

    path: str
    kind: str
    created: str
    versions: dict[str, str]
    source: SourceDict
    model: ModelDict
    stages: list[dict[str, object]]
    layers: list[LayerDict]
    outputs: dict[str, str] | None
    files: dict[str, FileStatus]
    total_bytes: int


def describe(directory: Path) -> ArtifactInfo:
    """What an artifact is and how it was made, for ``wasi-tool info``: its kind (the last
    stage), source, model, stage history, layers, and every file with its size, its recorded
    sha256 and whether the file on disk still matches it."""
    directory = Path(directory)
    if not directory.exists():
        raise WasiToolError(f"no such file or directory: {directory}")
    manifest = load_manifest(directory)
    files: dict[str, FileStatus] = {}
    for name, entry in sorted(manifest.files.items()):
        path = safe_member(directory, name)
        present = path.is_file()
        size = path.stat().st_size if present else entry["bytes"]
        files[name] = {
            "bytes": size,
            "sha256": entry["sha256"],
            "status": (
                "missing"
                if not present
                else "mismatch"  # size before hash: a file of another size is never read
                if size != entry["bytes"] or sha256_file(path) != entry["sha256"]
                else "ok"
            ),
        }
    manifest_bytes = (directory / MANIFEST).stat().st_size
    files[MANIFEST] = {"bytes": manifest_bytes, "sha256": None, "status": "this record"}
    return {
        "path": str(directory),
        "kind": manifest.kind,
        "created": manifest.created,
        "versions": manifest.versions,
        "source": manifest.source,
        "model": manifest.model.to_dict(),
        "stages": [s.to_dict() for s in manifest.stages],
        "layers": [x.to_dict() for x in manifest.layers],
        "outputs": manifest.outputs,
        "files": files,
        "total_bytes": sum(int(f["bytes"] or 0) for f in files.values()),
    }


def save_weights(
    path: Path, tensors: Mapping[str, torch.Tensor], meta: WeightsMetadata | Mapping[str, Any]
) -> None:
    """Write tensors to safetensors; each metadata value is stored as a string (JSON if needed)."""
    from safetensors.torch import save_file

    if isinstance(meta, WeightsMetadata):
        meta = meta.to_dict()

    metadata = {
        k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in meta.items()
    }
    plain: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in tensors.items():
        t = v.detach().contiguous()
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
        # safetensors refuses shared storage (tied embeddings): the second name gets a copy
        plain[k] = t.clone() if key in seen and t.numel() else t
        seen.add(key)
    try:
        save_file(plain, str(path), metadata=metadata)
    except Exception as exc:  # safetensors reports I/O errors as its own type
        os_error = _as_os_error(exc)
        if os_error is None:
            raise
        raise os_error from None
    _canonical_header(path)


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys, so that the same tensors and metadata
    always give the same bytes (safetensors writes its metadata map in hash order, which
    changes from process to process). The data is not touched: the header is rewritten in
    place when its padded length is unchanged, else the file is copied behind a new one."""
    with open(path, "r+b") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        blob = text.encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # safetensors pads its header to 8 bytes
        if len(blob) == length:
            fh.seek(8)
            fh.write(blob)
            return
    tmp = path.with_name(f".{path.name}.canonical")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        src.seek(8 + length)
        dst.write(struct.pack("<Q", len(blob)) + blob)
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, path)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: (tensors, metadata). Corrupt files raise WasiToolError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise WasiToolError(f"no such file: {path}") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt headers/data
        raise WasiToolError(f"cannot read safetensors file {path}: {exc}") from None
    return tensors, metadata


def finite_json(payload: Any) -> Any:
    """``payload`` with every non-finite float (NaN, inf) as None: JSON has no NaN, and strict
    readers refuse the bare ``NaN`` Python writes by default."""
    if isinstance(payload, float):
        return payload if math.isfinite(payload) else None
    if isinstance(payload, dict):
        return {k: finite_json(v) for k, v in payload.items()}
    if isinstance(payload, list | tuple):
        return [finite_json(v) for v in payload]
    return payload


def dumps_json(payload: Any) -> str:
    """Strict JSON text of ``payload`` (non-finite floats as null), indented, newline-ended."""
    return json.dumps(finite_json(payload), indent=2, allow_nan=False) + "\n"


def write_json(path: Path, payload: Any) -> None:
    path.write_text(dumps_json(payload), encoding="utf-8")


def file_entries(directory: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file in ``directory`` (manifest.json itself excluded)."""
    return {
        p.name: FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size)
        for p in (safe_member(directory, q.name) for q in sorted(directory.iterdir()))
        if p.is_file() and p.name != MANIFEST
    }


def write_artifact(
    out: Path,
    tensors: Mapping[str, torch.Tensor],
    weights_meta: WeightsMetadata | Mapping[str, Any],
    manifest: Manifest | Callable[[], Manifest],
    report: Any,
    extra: Callable[[Path], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete artifact directory atomically and return its path.

    ``manifest`` is completed with the creation time, the versions and the file hashes, and
    validated before it is written. ``extra(staging_dir)`` may add files (plots, ONNX) before
    the hashes are taken; ``manifest`` and ``report`` (the JSON of report.json) may be
    callables, called after ``extra``, for what ``extra`` produces (an export's file roles).
    """
    with atomic_directory(out, overwrite) as staging:
        save_weights(staging / WEIGHTS, tensors, weights_meta)
        if extra is not None:
            extra(staging)
        write_json(staging / REPORT, report() if callable(report) else report)
        made = manifest() if callable(manifest) else manifest
        full = made.completed(file_entries(staging), now_iso(), versions()).to_dict()
        validate_manifest(full)
        write_json(staging / MANIFEST, full)
    return out


def verify_files(directory: Path, manifest: Manifest | Mapping[str, Any], names: list[str]) -> None:
    """Check the named files against the sha256 the manifest recorded."""
    recorded = manifest.files if isinstance(manifest, Manifest) else manifest["files"]
    for name in names:
        entry = recorded.get(name)
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise WasiToolError(f"{directory / MANIFEST}: no sha256 recorded for {name}")
        path = safe_member(directory, name)
        if not path.is_file():
            raise WasiToolError(f"artifact {directory} is missing {name}")
        size = path.stat().st_size
        if size != entry.get("bytes"):  # before hashing: a sparse 1 TiB file is never read
            raise WasiToolError(
                f"{path} is {size} bytes, its manifest records {entry.get('bytes')} (corrupt or "
                "replaced?)"
            )
        if sha256_file(path) != entry["sha256"]:
            raise WasiToolError(f"{path} does not match its sha256 in the manifest (corrupt?)")


def _as_os_error(exc: Exception) -> OSError | None:
    """The OSError behind a safetensors error ("I/O error: No space left on device (os error
    28)"), or None when it is not an I/O error."""
    match = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(exc))
    return OSError(int(match[2]), match[1]) if match else None
