"""Artifact directories: weights (safetensors), manifest.json, report.json, written atomically.

An artifact directory holds ``model.safetensors`` whose ``__metadata__`` (strings only) carries
what is needed to rebuild the module tree, and ``manifest.json`` that says how it was made.
This module does file I/O only; rebuilding models lives in ``wasi_tool.models``.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import hashlib
import json
import math
import os
import platform
import re
import shutil
import stat
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import torch

from wasi_tool._version import __version__
from wasi_tool.errors import WasiToolError
from wasi_tool.safe_read import read_json

ARTIFACT_FORMAT = "wasi-tool-artifact"
WEIGHTS_FORMAT = "wasi-tool-weights"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
REPORT = "report.json"
# Manifest-bound work is capped: a manifest is read before its model is built, so its lists
# must not make `info` or a load run for minutes. Far above what any model has (a 70B Llama
# has 560 linear layers; a recipe a handful of stages).
MAX_LAYERS = 20_000
MAX_STAGES = 1_000
MAX_FILES = 1_000

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
    return datetime.now(UTC).isoformat(timespec="seconds")


def is_artifact_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and validate ``manifest.json`` of an artifact directory."""
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
    for key, limit in (("layers", MAX_LAYERS), ("stages", MAX_STAGES), ("files", MAX_FILES)):
        if len(manifest[key]) > limit:
            raise WasiToolError(
                f"{where}: {len(manifest[key])} {key} records, more than the {limit} allowed"
            )
    kwargs = manifest["model"].get("kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise WasiToolError(f"{where}: model kwargs must be an object, got {type(kwargs).__name__}")
    for name, entry in manifest["files"].items():
        if name in ("", ".", "..") or any(c in name for c in "/\\\0") or os.path.isabs(name):
            raise WasiToolError(f"{where}: files lists {name!r}, not a plain file name")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
            or not _count(entry.get("bytes"), 1 << 50)
        ):
            raise WasiToolError(f"{where}: files entry {name!r} needs a sha256 and a byte count")
    for layer in manifest["layers"]:
        sizes = (
            [layer.get(k) for k in ("out_features", "in_features", "rank")]
            if isinstance(layer, dict)
            else [None]
        )
        act = layer.get("act_ranks") if isinstance(layer, dict) else None
        if (
            not isinstance(layer, dict)
            or not isinstance(layer.get("name"), str)
            or len(layer["name"]) > 1000
            or not all(v is None or _count(v, 1 << 31) for v in sizes)
            or not (act is None or (isinstance(act, list) and len(act) <= 8))
        ):
            raise WasiToolError(
                f"{where}: a layer record needs a name and integer sizes, got {str(layer)[:80]}"
            )


def _count(value: Any, limit: int) -> bool:
    """An integer (not a bool) in 0..limit."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


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
        path = safe_member(directory, name)
        present = path.is_file()
        size = path.stat().st_size if present else entry.get("bytes")
        files[name] = {
            "bytes": size,
            "sha256": entry.get("sha256"),
            "status": (
                "missing"
                if not present
                else "mismatch"  # size before hash: a file of another size is never read
                if size != entry.get("bytes") or sha256_file(path) != entry.get("sha256")
                else "ok"
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


# -- path safety: names from a manifest or a directory listing ---------------------------------


def safe_member(directory: Path, name: str) -> Path:
    """``directory / name`` when ``name`` is a plain file name that stays inside ``directory``:
    no separator, not ``.``/``..``, not absolute, not a symbolic link, resolving inside.

    Every name taken from a manifest, a directory listing or a recipe that becomes a path
    inside an artifact goes through here, so an artifact never follows a link out of itself.
    Raises a one-line WasiToolError naming the file.
    """
    directory = Path(directory)
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or os.path.isabs(name)
    ):
        raise WasiToolError(f"{directory}: {name!r} is not a plain file name inside the artifact")
    path = directory / name
    if path.is_symlink():
        raise WasiToolError(
            f"{path} is a symbolic link; an artifact's files must be regular files inside it"
        )
    try:
        inside = path.resolve().is_relative_to(directory.resolve())
    except (OSError, RuntimeError):  # a symlink loop in the directory's own path
        inside = False
    if not inside:
        raise WasiToolError(f"{path} resolves outside {directory}")
    return path


# -- the output-path rule: no output of a command overwrites what it reads ------------------

# The inputs of the command running now (None outside a command's scope): the paths it was
# given and every artifact it has read since (read_manifest notes each).
_INPUTS: contextvars.ContextVar[tuple[Path, ...] | None] = contextvars.ContextVar(
    "wasi_tool_inputs", default=None
)


def _exists(path: str | Path) -> bool:
    try:
        return os.path.lexists(path)
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


@contextlib.contextmanager
def command_inputs(paths: Iterable[str | Path | None] = ()) -> Iterator[None]:
    """The scope of one command. Its inputs are ``paths`` (those that exist: arguments that
    name files or directories) and every artifact it reads inside the scope; no output of the
    command may be one of them or lie inside one (``check_output_path``). Nested scopes add
    to the outer one's inputs."""
    given = tuple(Path(p) for p in paths if p is not None and _exists(p))
    token = _INPUTS.set((*(_INPUTS.get() or ()), *given))
    try:
        yield
    finally:
        _INPUTS.reset(token)


def note_input(path: str | Path) -> None:
    """Record ``path`` as an input of the running command (nothing outside a scope)."""
    found = _INPUTS.get()
    if found is not None and Path(path) not in found:
        _INPUTS.set((*found, Path(path)))


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)  # also a hard link to the same bytes
    except (OSError, ValueError):
        return False


def check_output_path(
    out: str | Path, inputs: Iterable[str | Path | None] = (), *, directory: bool = False
) -> None:
    """The output-path rule, part 1: ``out`` (a file, or with ``directory`` a directory that
    replaces whatever is there) must not resolve to an input of the command (``inputs`` and
    the running command's, see ``command_inputs``), nor lie inside an input directory or
    artifact; a directory output must not hold an input (replacing it would delete it).
    Raises a one-line WasiToolError naming both."""
    target = os.path.realpath(out)
    scoped = _INPUTS.get() or ()
    for given in (*(Path(p) for p in inputs if p is not None), *scoped):
        if not _exists(given):
            continue
        source = os.path.realpath(given)
        if target == source or _same_file(out, given):
            raise WasiToolError(
                f"output {out} is an input of this command ({given}); refusing to overwrite it"
            )
        if os.path.isdir(source) and _inside(target, source):
            what = "artifact" if os.path.isfile(os.path.join(source, MANIFEST)) else "directory"
            raise WasiToolError(
                f"output {out} is inside the input {what} {given}; refusing to write into it"
            )
        if directory and _inside(source, target):
            raise WasiToolError(
                f"output {out} holds the input {given}; replacing it would delete that input"
            )


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_output_file(path: str | Path, inputs: Iterable[str | Path | None] = ()) -> None:
    """The output-path rule for a file the tool writes (``--json``, ``--predictions``, a
    report): ``check_output_path``, and ``path`` must be absent or a regular file (never a
    link, a directory, a device, a FIFO or a socket: the atomic write would replace it)."""
    check_output_path(path, inputs)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:  # a parent that is a file, no permission, ...
        raise WasiToolError(f"cannot write {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise WasiToolError(
            f"output {path} is {_kind(mode)}, not a regular file; refusing to write over it"
        )


@contextlib.contextmanager
def atomic_file(
    path: str | Path,
    inputs: Iterable[str | Path | None] = (),
    *,
    binary: bool = False,
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """Yield a file handle whose content becomes ``path`` only if the block succeeds: the
    output-path rule first (``check_output_file``), then a temporary beside ``path``,
    flushed, checked again and renamed onto it. On any error nothing is left: not the
    temporary, not the parent directories this call created, and ``path`` is as it was."""
    path = Path(path)
    inputs = tuple(inputs)
    check_output_file(path, inputs)
    created: list[Path] = []

    def remove_created() -> None:
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()

    try:
        _makedirs_tracked(Path(os.path.abspath(path.parent)), created)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        remove_created()
        raise WasiToolError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        mode = "wb" if binary else "w"
        encoding = None if binary else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; an output is shared data
        check_output_file(path, inputs)  # again: what appeared there meanwhile is not replaced
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        remove_created()
        if isinstance(exc, OSError):
            raise WasiToolError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def write_file(
    path: str | Path, data: str | bytes, inputs: Iterable[str | Path | None] = ()
) -> None:
    """``data`` to ``path`` through ``atomic_file`` (the output-path rule, an atomic write)."""
    with atomic_file(path, inputs, binary=isinstance(data, bytes)) as fh:
        fh.write(data)


# -- output directories: claim, replace, publish -----------------------------------------------


def is_wasi_artifact(path: Path) -> bool:
    """``path`` is a directory whose ``manifest.json`` says it is a wasi-tool artifact (any
    format version: a newer tool's artifact is still one --overwrite may replace)."""
    manifest = Path(path) / MANIFEST
    if not Path(path).is_dir() or manifest.is_symlink() or not manifest.is_file():
        return False
    try:
        found = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(found, dict) and found.get("format") == ARTIFACT_FORMAT


def _empty_dir(path: Path) -> bool:
    try:
        return path.is_dir() and not any(path.iterdir())
    except OSError:
        return False


def check_output_dir(
    out: Path, overwrite: bool, replaceable: Callable[[Path], bool] = is_wasi_artifact
) -> None:
    """Fail early, before any work, when ``out`` cannot be written.

    ``--overwrite`` replaces only what wasi-tool wrote (``replaceable``: by default a directory
    with a wasi-tool manifest) or an empty directory; anything else is left untouched.
    """
    out = Path(out)
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise WasiToolError(f"output {out} already exists (pass --overwrite to replace it)")
    if out.is_symlink():
        raise WasiToolError(f"output {out} is a symbolic link; refusing to replace it")
    if not out.is_dir():
        raise WasiToolError(f"output {out} exists and is not a directory")
    if not (_empty_dir(out) or replaceable(out)):
        raise WasiToolError(
            f"output {out} is not a wasi-tool artifact (no valid {MANIFEST}); refusing to "
            "replace it with --overwrite"
        )


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
_renameat2_fn: Any = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2) with ``flags``; False when this kernel, libc or file system does not
    support it (the caller falls back), OSError (FileExistsError, ...) when it fails."""
    global _renameat2_fn
    if _renameat2_fn is None:
        fn: Any = False
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
                fn.argtypes += [ctypes.c_uint]
                fn.restype = ctypes.c_int
        _renameat2_fn = fn
    if not _renameat2_fn:
        return False
    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(dst))


def _publish_new(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out`` only if nothing is at ``out``: one atomic, exclusive
    step (no check-then-act). Raises FileExistsError when ``out`` exists."""
    if _renameat2(staging, out, _RENAME_NOREPLACE):
        return
    # fallback: claim ``out`` by creating it (exclusive), then rename onto our own empty claim
    os.mkdir(out)
    try:
        os.rename(staging, out)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            out.rmdir()
        if isinstance(exc, OSError) and exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            # an --overwrite writer replaced our empty claim with its output meanwhile
            raise FileExistsError(exc.errno, exc.strerror, str(out)) from None
        raise


def _publish_replacing(
    staging: Path, out: Path, replaceable: Callable[[Path], bool]
) -> Path | None:
    """Put ``staging`` at ``out``, replacing what is there. Returns a directory that holds the
    old output (to remove), or None."""
    for _ in range(8):  # another writer may publish between our steps: try again
        if not os.path.lexists(out):
            try:
                _publish_new(staging, out)
                return None
            except FileExistsError:
                continue
        check_output_dir(out, True, replaceable)
        if _renameat2(staging, out, _RENAME_EXCHANGE):  # atomic swap: out is never missing
            return staging
        # no exchange here: set the old output aside, publish, put it back if that fails
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "old"), dir=out.parent))
        moved = False
        try:
            with contextlib.suppress(FileNotFoundError):
                os.rename(out, old / out.name)
                moved = True
            _publish_new(staging, out)
            return old
        except FileExistsError:  # another writer published meanwhile: replace theirs
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            if moved:  # out is free again (the claim of a failed fallback publish is gone)
                with contextlib.suppress(OSError):
                    os.rename(old / out.name, out)
            shutil.rmtree(old, ignore_errors=True)
            raise
    raise WasiToolError(f"output {out} kept changing while it was written; try again")


def io_error_message(what: str, exc: BaseException) -> str | None:
    """One line for an I/O failure (a full disk, a read-only file system, no permission, ...),
    or None when ``exc`` is not one."""
    cause: BaseException | None = exc
    while cause is not None:  # an OSError re-raised by a library as its own type
        if isinstance(cause, OSError):
            return f"cannot write {what}: {cause.strerror or cause}"
        cause = cause.__cause__
    return None


def _as_os_error(exc: Exception) -> OSError | None:
    """The OSError behind a safetensors error ("I/O error: No space left on device (os error
    28)"), or None when it is not an I/O error."""
    match = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(exc))
    return OSError(int(match[2]), match[1]) if match else None


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", platform.node())[:16] or "host"


def _temp_prefix(out: Path, kind: str) -> str:
    """Temporaries beside ``out`` name their writer (host and pid), so a later run can tell a
    live writer's from one left by a killed process."""
    return f".{out.name}.{kind}-{_host_tag()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def sweep_stale(out: Path) -> list[Path]:
    """Remove the temporaries a killed writer of ``out`` left beside it (SIGKILL or power loss
    skips every cleanup): staging directories (``.<out>.tmp-<host>-<pid>-*``) whose process on
    this host is gone, and set-aside old outputs (``.old-``) of such a process once ``out``
    exists again (before that they may hold the only copy of the previous output). Returns
    what was removed."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-{_host_tag()}-(\d+)-[A-Za-z0-9_]+")
    removed: list[Path] = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        if _alive(int(match[2])) or (match[1] == "old" and not os.path.lexists(out)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_directory(
    out: Path, overwrite: bool = False, replaceable: Callable[[Path], bool] = is_wasi_artifact
) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``out`` only if the block succeeds.

    Staging lives beside ``out`` (same file system, so the final rename is atomic). Without
    ``overwrite`` the publish is one exclusive rename (renameat2 RENAME_NOREPLACE, or an
    exclusive mkdir claim): of two concurrent writers one wins and the other fails with
    "already exists". With ``overwrite`` only an existing output that ``replaceable`` accepts
    (default: a wasi-tool artifact) or an empty directory is replaced, atomically swapped
    where the kernel can. On any error (a full disk, a read-only file system, no permission)
    the staging directory, any parent directories this call created and any set-aside old
    output are removed, and an existing ``out`` is left as it was.
    """
    out = Path(out)
    check_output_path(out, directory=True)
    check_output_dir(out, overwrite, replaceable)
    created: list[Path] = []

    def remove_created() -> None:
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()

    try:
        _makedirs_tracked(out.parent.resolve(), created)
        sweep_stale(out)
        staging = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "tmp"), dir=out.parent))
    except OSError as exc:
        remove_created()
        raise WasiToolError(f"cannot create output {out}: {exc.strerror or exc}") from None
    old: Path | None = None
    try:
        yield staging
        umask = _umask()
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; an artifact is shared data
        for item in staging.iterdir():
            item = safe_member(staging, item.name)  # chmod would follow a link out
            os.chmod(item, 0o666 & ~umask)
            _fsync_path(item)
        try:
            if overwrite:
                old = _publish_replacing(staging, out, replaceable)
            else:
                _publish_new(staging, out)
        except FileExistsError:
            raise WasiToolError(
                f"output {out} already exists (another run wrote it first; pass --overwrite "
                "to replace it)"
            ) from None
        _fsync_path(out.parent)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)  # after a swap: the old output
        remove_created()
        message = io_error_message(str(out), exc)
        if message is not None:
            raise WasiToolError(message) from None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


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


def file_entries(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in ``directory`` (manifest.json itself excluded)."""
    return {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in (safe_member(directory, q.name) for q in sorted(directory.iterdir()))
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
