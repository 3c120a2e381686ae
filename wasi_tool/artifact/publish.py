"""Publishing artifacts and output files atomically: the output-path rule (no output of a
command overwrites what it reads), safe member names inside an artifact, atomic files and
directories (a temporary beside the output, renamed onto it), and the sweep of temporaries a
killed writer left. File names and formats: ``names``; what an artifact holds: ``records``
and ``io``.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import json
import os
import platform
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from wasi_tool.artifact.names import ARTIFACT_FORMAT, MANIFEST
from wasi_tool.errors import WasiToolError


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
