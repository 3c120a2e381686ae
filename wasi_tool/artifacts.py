"""Artifact directories: weights (safetensors), manifest.json, report.json, written atomically.

An artifact directory holds ``model.safetensors`` whose ``__metadata__`` (strings only) carries
what is needed to rebuild the module tree, and ``manifest.json`` that says how it was made.
This module does file I/O only; rebuilding models lives in ``wasi_tool.models``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from wasi_tool._version import __version__
from wasi_tool.errors import WasiToolError

ARTIFACT_FORMAT = "wasi-tool-artifact"
WEIGHTS_FORMAT = "wasi-tool-weights"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
REPORT = "report.json"

# Keys a manifest of FORMAT_VERSION must have, with the type each must be.
_MANIFEST_KEYS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "format_version": int,
    "created": str,
    "versions": dict,
    "source": dict,
    "model": dict,
    "stages": list,
    "layers": list,
    "files": dict,
}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Versions of the software that made an artifact."""
    import timm

    return {
        "wasi_tool": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_artifact_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and validate ``manifest.json`` of an artifact directory."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        raise WasiToolError(f"{directory} is not a wasi-tool artifact (no {MANIFEST})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WasiToolError(f"cannot read {path}: {exc}") from None
    validate_manifest(manifest, path)
    return manifest


def validate_manifest(manifest: Any, where: Path | str = MANIFEST) -> None:
    """Raise WasiToolError unless ``manifest`` is a manifest this version can read."""
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise WasiToolError(f"{where}: not a wasi-tool manifest (format != {ARTIFACT_FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise WasiToolError(f"{where}: format_version must be an integer, got {version!r}")
    if version != FORMAT_VERSION:
        raise WasiToolError(
            f"{where}: format_version {version} is not supported by wasi-tool {__version__} "
            f"(reads version {FORMAT_VERSION})"
        )
    for key, kind in _MANIFEST_KEYS.items():
        if key not in manifest:
            raise WasiToolError(f"{where}: missing key {key!r}")
        if not isinstance(manifest[key], kind):
            raise WasiToolError(f"{where}: key {key!r} has the wrong type")


def describe(directory: Path) -> dict[str, Any]:
    """What an artifact is and how it was made, for ``wasi-tool info``: its kind (the last
    stage), source, model, stage history, layers, and every file with its size, its recorded
    sha256 and whether the file on disk still matches it."""
    directory = Path(directory)
    if not directory.exists():
        raise WasiToolError(f"no such file or directory: {directory}")
    manifest = read_manifest(directory)
    stages = [s for s in manifest["stages"] if isinstance(s, dict)]
    files: dict[str, dict[str, Any]] = {}
    for name, entry in sorted(manifest["files"].items()):
        entry = entry if isinstance(entry, dict) else {}
        path = directory / name
        present = path.is_file()
        files[name] = {
            "bytes": path.stat().st_size if present else entry.get("bytes"),
            "sha256": entry.get("sha256"),
            "status": (
                "missing"
                if not present
                else "ok"
                if sha256_file(path) == entry.get("sha256")
                else "mismatch"
            ),
        }
    manifest_bytes = (directory / MANIFEST).stat().st_size
    files[MANIFEST] = {"bytes": manifest_bytes, "sha256": None, "status": "this record"}
    return {
        "path": str(directory),
        "kind": str(stages[-1].get("stage", "artifact")) if stages else "artifact",
        "created": manifest["created"],
        "versions": manifest["versions"],
        "source": manifest["source"],
        "model": manifest["model"],
        "stages": stages,
        "layers": manifest["layers"],
        "outputs": manifest.get("outputs"),
        "files": files,
        "total_bytes": sum(int(f["bytes"] or 0) for f in files.values()),
    }


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _makedirs_tracked(path: Path, created: list[Path]) -> None:
    """mkdir -p, appending each directory it creates to ``created`` (deepest last), so a
    caller can remove them even when a later mkdir fails."""
    for parent in reversed([path, *path.parents]):
        if not parent.exists():
            parent.mkdir()
            created.append(parent)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail early, before any work, when ``out`` cannot be written."""
    if out.exists() and not overwrite:
        raise WasiToolError(f"output {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise WasiToolError(f"output {out} exists and is not a directory")


@contextlib.contextmanager
def atomic_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``out`` only if the block succeeds.

    Staging lives beside ``out`` (same file system, so the final rename is atomic). On any
    error the staging directory, and any parent directories this call created, are removed,
    and an existing ``out`` is left as it was.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    created: list[Path] = []

    def remove_created() -> None:
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()

    try:
        _makedirs_tracked(out.parent.resolve(), created)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        remove_created()
        raise WasiToolError(f"cannot create output {out}: {exc.strerror or exc}") from None
    try:
        yield staging
        umask = _umask()
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; an artifact is shared data
        for item in staging.iterdir():
            os.chmod(item, 0o666 & ~umask)
            _fsync_path(item)
        old: Path | None = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(staging, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_path(out.parent)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        remove_created()
        if isinstance(exc, OSError):
            raise WasiToolError(f"cannot write {out}: {exc.strerror or exc}") from None
        raise


def save_weights(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write tensors to safetensors; each metadata value is stored as a string (JSON if needed)."""
    from safetensors.torch import save_file

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
    save_file(plain, str(path), metadata=metadata)


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


def file_entries(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in ``directory`` (manifest.json itself excluded)."""
    return {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def write_artifact(
    out: Path,
    tensors: Mapping[str, torch.Tensor],
    weights_meta: Mapping[str, Any],
    manifest: dict[str, Any],
    report: Any,
    extra: Callable[[Path], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete artifact directory atomically and return its path.

    ``manifest`` is completed with format, version, creation time and file hashes.
    ``extra(staging_dir)`` may add files (plots, ONNX) before the hashes are taken; ``report``
    may be a callable, called after ``extra``, for figures that ``extra`` produces.
    """
    with atomic_directory(out, overwrite) as staging:
        save_weights(staging / WEIGHTS, tensors, weights_meta)
        if extra is not None:
            extra(staging)
        write_json(staging / REPORT, report() if callable(report) else report)
        full = {
            "format": ARTIFACT_FORMAT,
            "format_version": FORMAT_VERSION,
            "created": now_iso(),
            "versions": versions(),
            **manifest,
            "files": file_entries(staging),
        }
        validate_manifest(full)
        write_json(staging / MANIFEST, full)
    return out


def verify_files(directory: Path, manifest: Mapping[str, Any], names: list[str]) -> None:
    """Check the named files against the sha256 the manifest recorded."""
    for name in names:
        entry = manifest["files"].get(name)
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise WasiToolError(f"{directory / MANIFEST}: no sha256 recorded for {name}")
        path = directory / name
        if not path.is_file():
            raise WasiToolError(f"artifact {directory} is missing {name}")
        if sha256_file(path) != entry["sha256"]:
            raise WasiToolError(f"{path} does not match its sha256 in the manifest (corrupt?)")
