"""Output safety at the artifact writer (wasi_tool/artifact/): concurrent writers to one
--out, --overwrite of what wasi-tool did not write, byte-reproducible artifacts, symbolic
links in an artifact, and I/O errors (full disk, read-only, no permission) while writing."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from wasi_tool import artifact as artifacts  # `artifact` is a fixture here
from wasi_tool.artifact import io as artifact_io
from wasi_tool.artifact import publish as pub
from wasi_tool.cli.app import app
from wasi_tool.errors import WasiToolError
from wasi_tool.models import ModelSource, hf, load_model
from wasi_tool.stages import CompressConfig, run_compress

TINY_ARCH = "vit_tiny_patch16_224"
SRC = ModelSource(random_init=True, arch=TINY_ARCH, img_size=32)
T = ["--random-init", "--arch", TINY_ARCH, "--img-size", "32", "--rank-ratio", "0.5"]


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=gen), "b": torch.zeros(4)}


def _write(out: Path, who: str = "a", overwrite: bool = False, extra: Any = None) -> Path:
    return artifacts.write_artifact(
        out,
        _tensors(),
        {"format": artifacts.WEIGHTS_FORMAT, "who": who},
        artifacts.Manifest(
            source={"who": who}, model=artifacts.ModelRecord(), stages=[], layers=[]
        ),
        {"who": who},
        extra=extra,
        overwrite=overwrite,
    )


def _leftovers(parent: Path, out: Path) -> list[str]:
    """Anything beside ``out`` (staging or set-aside directories)."""
    return sorted(p.name for p in parent.iterdir() if p != out)


@pytest.fixture(params=["renameat2", "fallback"])
def publish(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run a test with the kernel's renameat2 and with the portable fallback (mkdir claim,
    set-aside) that a file system without RENAME_NOREPLACE/RENAME_EXCHANGE gets."""
    if request.param == "fallback":
        monkeypatch.setattr(pub, "_renameat2", lambda *args: False)
    elif not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux only")
    yield request.param


# -- 1. concurrency ----------------------------------------------------------------------------


def _race(out: Path, overwrite: bool) -> list[tuple[str, str]]:
    """Two writers that both pass the early check and reach the publish step together."""
    barrier = threading.Barrier(2)
    results: list[tuple[str, str]] = []

    def writer(who: str) -> None:
        try:
            _write(out, who, overwrite, extra=lambda staging: barrier.wait(timeout=60))
            results.append(("ok", who))
        except WasiToolError as exc:
            results.append(("error", str(exc)))

    threads = [threading.Thread(target=writer, args=(w,)) for w in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_concurrent_writers_one_wins_one_clean_error(tmp_path: Path, publish: str) -> None:
    out = tmp_path / "out"
    results = _race(out, overwrite=False)
    oks = [who for status, who in results if status == "ok"]
    errors = [msg for status, msg in results if status == "error"]
    assert len(oks) == 1 and len(errors) == 1, results
    assert "already exists" in errors[0] and "\n" not in errors[0]
    manifest = artifacts.read_manifest(out)  # the winner's, complete and consistent
    assert manifest["source"] == {"who": oks[0]}
    artifacts.verify_files(out, manifest, sorted(manifest["files"]))
    assert _leftovers(tmp_path, out) == []


def test_two_concurrent_overwriters_leave_one_complete_artifact(
    tmp_path: Path, publish: str
) -> None:
    out = _write(tmp_path / "out", "old")
    results = _race(out, overwrite=True)
    assert [s for s, _ in results] == ["ok", "ok"], results
    manifest = artifacts.read_manifest(out)
    assert manifest["source"]["who"] in {"a", "b"}
    artifacts.verify_files(out, manifest, sorted(manifest["files"]))
    assert _leftovers(tmp_path, out) == []


def test_an_existing_empty_dir_or_dangling_link_is_not_taken_without_overwrite(
    tmp_path: Path, publish: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for name in ("empty", "dangling"):
        with pytest.raises(WasiToolError, match="already exists"):
            _write(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "empty"]


def test_publish_loses_the_race_after_the_early_check(tmp_path: Path, publish: str) -> None:
    """Another run writes ``out`` after this one's early check: exclusive publish refuses."""
    out = tmp_path / "out"
    with pytest.raises(WasiToolError, match="another run wrote it first"):
        _write(out, "late", extra=lambda staging: _write(out, "first"))
    assert artifacts.read_manifest(out)["source"] == {"who": "first"}
    assert _leftovers(tmp_path, out) == []


def test_a_fallback_claim_taken_over_meanwhile_is_already_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without renameat2 the claim is an empty directory; an --overwrite writer may replace
    it before our rename: that is "already exists", and their output stays."""
    monkeypatch.setattr(pub, "_renameat2", lambda *args: False)
    staging, out = tmp_path / "staging", tmp_path / "out"
    staging.mkdir()

    def taken(src: Path, dst: Path) -> None:
        (Path(dst) / "theirs").write_text("y")
        raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY))

    monkeypatch.setattr(os, "rename", taken)
    with pytest.raises(FileExistsError):
        pub._publish_new(staging, out)
    assert (out / "theirs").read_text() == "y"


@pytest.mark.slow
def test_two_compress_processes_to_one_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    argv = [sys.executable, "-m", "wasi_tool", "compress", *T, "--out", str(out)]
    procs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    done = [(p.wait(), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in done)
    assert codes == [0, 1], done
    stderr = next(err for code, _, err in done if code == 1).strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("error: ") and "already exists" in stderr[0]
    artifacts.verify_files(out, artifacts.read_manifest(out), [artifacts.WEIGHTS])
    assert _leftovers(tmp_path, out) == []


def test_a_writer_killed_mid_write_leaves_staging_that_the_next_write_sweeps(
    tmp_path: Path,
) -> None:
    """SIGKILL skips every cleanup: the killed writer's staging directory stays beside --out.
    The next write to that --out removes it (its process is gone), and nothing else: a live
    writer's staging, and a set-aside old output while --out is missing, are kept."""
    out = tmp_path / "out"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from wasi_tool import artifact as artifacts\n"
            "with artifacts.atomic_directory(Path(sys.argv[1])) as d:\n"
            "    (d / 'model.safetensors').write_bytes(b'half')\n"
            "    print('ready', flush=True)\n"
            "    time.sleep(600)\n",
            str(out),
        ],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    child.kill()
    child.wait()
    left = _leftovers(tmp_path, out)
    assert len(left) == 1 and left[0].startswith(f".out.tmp-{pub._host_tag()}-{child.pid}-")
    live = tmp_path / f"{pub._temp_prefix(out, 'tmp')}live"  # this process: alive
    live.mkdir()
    old_kept = tmp_path / f".out.old-{pub._host_tag()}-{child.pid}-x"
    old_kept.mkdir()
    (old_kept / "out").mkdir()  # the previous output, set aside when the writer died

    _write(out)  # out was missing: the dead writer's old output is the only copy, kept
    assert _leftovers(tmp_path, out) == sorted([live.name, old_kept.name])
    _write(out, overwrite=True)  # out exists again: the set-aside copy is stale now
    assert _leftovers(tmp_path, out) == [live.name]


# -- 2. --overwrite replaces only what wasi-tool wrote -----------------------------------------


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*")}


@pytest.mark.parametrize(
    "content",
    [
        {"notes.txt": b"my thesis"},
        {"manifest.json": b'{"name": "some npm package"}'},
        {"manifest.json": b"{not json"},
    ],
    ids=["plain files", "someone else's manifest", "unreadable manifest"],
)
def test_overwrite_refuses_a_directory_that_is_not_an_artifact(
    tmp_path: Path, publish: str, content: dict[str, bytes]
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    for name, blob in content.items():
        (out / name).write_bytes(blob)
    before = _snapshot(out)
    with pytest.raises(WasiToolError, match="is not a wasi-tool artifact") as info:
        _write(out, overwrite=True)
    assert "\n" not in str(info.value) and "refusing to replace it" in str(info.value)
    assert _snapshot(out) == before
    assert _leftovers(tmp_path, out) == []


def test_overwrite_replaces_an_artifact_or_an_empty_dir(tmp_path: Path, publish: str) -> None:
    out = _write(tmp_path / "out", "old")
    _write(out, "new", overwrite=True)
    assert artifacts.read_manifest(out)["source"] == {"who": "new"}
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty", "new", overwrite=True)
    assert artifacts.is_wasi_artifact(tmp_path / "empty")
    assert _leftovers(tmp_path, out) == ["empty"]


def test_overwrite_refuses_an_output_that_is_a_symlink(tmp_path: Path) -> None:
    target = _write(tmp_path / "real", "old")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(WasiToolError, match="is a symbolic link; refusing"):
        _write(tmp_path / "link", "new", overwrite=True)
    assert (tmp_path / "link").is_symlink()
    assert artifacts.read_manifest(target)["source"] == {"who": "old"}


def test_cli_overwrite_of_a_plain_directory_is_one_line_and_leaves_it(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["compress", *T, "--out", str(out), "--overwrite"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: output {out} is not a wasi-tool artifact (no valid manifest.json); refusing "
        "to replace it with --overwrite"
    ]
    assert _snapshot(out) == {"notes.txt": b"keep me"}


def test_a_run_replaces_its_own_bench_and_report_outputs_only(tmp_path: Path) -> None:
    """A run's bench and report stages write no manifest: their outputs are recognised by
    their own file; anything else in the run directory is refused."""
    from wasi_tool.pipeline.kinds import _stage_output
    from wasi_tool.pipeline.report import BENCH_FILE

    bench, plain = tmp_path / "bench", tmp_path / "plain"
    for d, name in ((bench, BENCH_FILE), (plain, "notes.txt")):
        d.mkdir()
        (d / name).write_text("{}")
    for d in (bench, plain):
        with (
            pytest.raises(WasiToolError, match="not a wasi-tool artifact"),
            artifacts.atomic_directory(d, overwrite=True) as staging,
        ):
            (staging / BENCH_FILE).write_text("{}")
    with artifacts.atomic_directory(bench, overwrite=True, replaceable=_stage_output) as st:
        (st / BENCH_FILE).write_text('{"new": 1}')
    assert json.loads((bench / BENCH_FILE).read_text()) == {"new": 1}
    with (
        pytest.raises(WasiToolError, match="not a wasi-tool artifact"),
        artifacts.atomic_directory(plain, overwrite=True, replaceable=_stage_output) as st,
    ):
        (st / BENCH_FILE).write_text("{}")
    assert (plain / "notes.txt").read_text() == "{}"


# -- 3. byte-reproducible artifacts ------------------------------------------------------------


def test_same_tensors_and_metadata_give_the_same_bytes(tmp_path: Path) -> None:
    """safetensors writes its metadata map in hash order (it changes between calls):
    save_weights sorts the header so the bytes do not."""
    meta = {f"key{i}": f"value {i}" for i in range(12)}
    digests = set()
    for k in range(4):
        path = tmp_path / f"{k}.safetensors"
        artifacts.save_weights(path, _tensors(), dict(reversed(meta.items())) if k % 2 else meta)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
        tensors, found = artifacts.load_weights(path)
        assert found == meta
        torch.testing.assert_close(tensors, _tensors())
    assert len(digests) == 1


def test_a_header_of_another_length_is_rewritten_with_its_data_intact(tmp_path: Path) -> None:
    """A header whose canonical form has another length (another writer's spacing): the file
    is rewritten behind a new header, the tensors unchanged."""
    path = tmp_path / "spaced.safetensors"
    artifacts.save_weights(path, _tensors(), {"b": "2", "a": "1"})
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    spaced = json.dumps(json.loads(blob[8 : 8 + length]), indent=4).encode()
    spaced += b" " * (-len(spaced) % 8)
    path.write_bytes(struct.pack("<Q", len(spaced)) + spaced + blob[8 + length :])
    artifact_io._canonical_header(path)
    assert path.read_bytes() == blob
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spaced.safetensors"]


@pytest.mark.slow
def test_two_identical_compress_runs_give_identical_artifacts(tmp_path: Path) -> None:
    a = run_compress(SRC, CompressConfig(rank_ratio=0.5), tmp_path / "a").out
    b = run_compress(SRC, CompressConfig(rank_ratio=0.5), tmp_path / "b").out
    weights = [artifacts.sha256_file(d / artifacts.WEIGHTS) for d in (a, b)]
    assert weights[0] == weights[1]

    def manifest(d: Path) -> dict[str, Any]:  # minus when it was made and how long it took
        m = artifacts.read_manifest(d)
        m.pop("created")
        m["files"].pop(artifacts.REPORT)
        return m

    def report(d: Path) -> dict[str, Any]:
        r: dict[str, Any] = json.loads((d / artifacts.REPORT).read_text())
        r.pop("seconds")
        return r

    assert manifest(a) == manifest(b) and report(a) == report(b)


# -- 4. symbolic links and names that leave the artifact ---------------------------------------


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/etc/passwd", "a\\b", "a\0b"])
def test_safe_member_refuses_names_that_are_not_plain(tmp_path: Path, name: str) -> None:
    with pytest.raises(WasiToolError, match="is not a plain file name inside the artifact"):
        artifacts.safe_member(tmp_path, name)


def test_safe_member_refuses_symlinks_even_inside(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("x")
    (tmp_path / "inside").symlink_to(tmp_path / "real")
    (tmp_path / "outside").symlink_to("/etc/hostname")
    for name in ("inside", "outside"):
        with pytest.raises(WasiToolError, match=f"{name} is a symbolic link"):
            artifacts.safe_member(tmp_path, name)
    assert artifacts.safe_member(tmp_path, "real") == tmp_path / "real"
    assert artifacts.safe_member(tmp_path, "absent") == tmp_path / "absent"


def _fake_artifact(directory: Path) -> Path:
    directory.mkdir()
    (directory / artifacts.MANIFEST).write_text(json.dumps({"format": artifacts.ARTIFACT_FORMAT}))
    return directory


def test_a_symlinked_tokenizer_in_an_artifact_is_refused_not_copied(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the artifact")
    art = _fake_artifact(tmp_path / "art")
    (art / "vocab.txt").write_text("[PAD]\n")
    (art / "tokenizer.json").symlink_to(secret)
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(WasiToolError, match=r"tokenizer\.json is a symbolic link"):
        hf.copy_tokenizer(art, staging)
    assert list(staging.iterdir()) == []
    (art / "tokenizer.json").unlink()
    (art / "tokenizer.json").symlink_to(tmp_path / "dangling")  # refused too, not skipped
    with pytest.raises(WasiToolError, match=r"tokenizer\.json is a symbolic link"):
        hf.tokenizer_files(art)


def test_a_hugging_face_directory_may_link_its_tokenizer(tmp_path: Path) -> None:
    """The hub cache links snapshot files to blobs: a source model directory (not an
    artifact) is copied by content, and the copy in the artifact is a regular file."""
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "abc").write_text('{"version": "1.0"}')
    snap = tmp_path / "snapshot"
    snap.mkdir()
    (snap / "tokenizer.json").symlink_to(tmp_path / "blobs" / "abc")
    staging = tmp_path / "staging"
    staging.mkdir()
    hf.copy_tokenizer(snap, staging)
    copied = staging / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_text() == '{"version": "1.0"}'


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("art") / "art")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_a_symlinked_weights_file_is_refused(tmp_path: Path, artifact: Path) -> None:
    art = _copy(artifact, tmp_path / "art")
    outside = tmp_path / "elsewhere.safetensors"
    (art / artifacts.WEIGHTS).rename(outside)
    (art / artifacts.WEIGHTS).symlink_to(outside)  # same bytes, same sha256: still refused
    with pytest.raises(WasiToolError, match=r"model\.safetensors is a symbolic link"):
        artifacts.verify_files(art, artifacts.read_manifest(art), [artifacts.WEIGHTS])
    with pytest.raises(WasiToolError, match=r"model\.safetensors is a symbolic link"):
        artifacts.describe(art)
    with pytest.raises(WasiToolError, match=r"model\.safetensors is a symbolic link"):
        load_model(ModelSource(checkpoint=art))


def test_a_link_made_while_writing_is_refused_not_followed(tmp_path: Path) -> None:
    """A file an ``extra`` step links into the staging directory is refused: chmod and the
    file hashes would follow it out (the file outside keeps its mode)."""
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    outside.chmod(0o600)
    with pytest.raises(WasiToolError, match=r"plot\.png is a symbolic link"):
        _write(tmp_path / "out", extra=lambda staging: (staging / "plot.png").symlink_to(outside))
    assert outside.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside.txt"]


def test_a_report_does_not_copy_a_linked_plot_from_a_stage(tmp_path: Path) -> None:
    from wasi_tool.pipeline.report import _plots

    stage, out = tmp_path / "c", tmp_path / "report"
    stage.mkdir()
    out.mkdir()
    (stage / "energy.png").symlink_to(tmp_path / "secret.png")
    (tmp_path / "secret.png").write_bytes(b"not a plot of this run")
    with pytest.raises(WasiToolError, match=r"energy\.png is a symbolic link"):
        _plots([], [("c", {"layers": []}, stage)], out)
    assert list(out.iterdir()) == []


def test_a_manifest_naming_a_file_outside_is_refused(tmp_path: Path, artifact: Path) -> None:
    art = _copy(artifact, tmp_path / "art")
    manifest = json.loads((art / artifacts.MANIFEST).read_text())
    manifest["files"]["../secret"] = {"sha256": "0" * 64, "bytes": 1}
    (art / artifacts.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(WasiToolError, match=r"files lists '\.\./secret', not a plain file name"):
        artifacts.describe(art)


# -- 5. I/O errors while writing: one message, no temporaries, the old output kept --------------


def _raiser(code: int) -> Any:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
@pytest.mark.parametrize("where", ["weights", "extra", "publish"])
def test_io_errors_leave_nothing_and_keep_the_old_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, publish: str, code: int, where: str
) -> None:
    out = _write(tmp_path / "out", "old")
    before = _snapshot(out)
    extra = None
    if where == "weights":
        monkeypatch.setattr(artifact_io, "save_weights", _raiser(code))
    elif where == "extra":
        extra = _raiser(code)
    else:  # the last step: the rename that publishes (or swaps)
        monkeypatch.setattr(pub, "_publish_new", _raiser(code))
        if publish == "renameat2":
            monkeypatch.setattr(pub, "_renameat2", _raiser(code))
    for overwrite, target in ((True, out), (False, tmp_path / "deep" / "new")):
        with pytest.raises(WasiToolError) as info:
            _write(target, "new", overwrite=overwrite, extra=extra)
        assert str(info.value) == f"cannot write {target}: {os.strerror(code)}"
        assert _snapshot(out) == before
        assert _leftovers(tmp_path, out) == []


def test_a_safetensors_io_error_is_an_os_error(tmp_path: Path) -> None:
    """safetensors raises its own type for I/O errors; save_weights gives the OSError."""
    with pytest.raises(OSError) as info:
        artifacts.save_weights(tmp_path / "absent" / "w.safetensors", _tensors(), {})
    assert info.value.errno == errno.ENOENT and info.value.strerror == os.strerror(errno.ENOENT)


def test_overwrite_deletes_a_checkpoint_folder_and_nothing_that_only_shares_its_name(
    tmp_path: Path,
) -> None:
    from wasi_tool.training import checkpoint

    ours = tmp_path / "run.ckpt"
    ours.mkdir()
    for name in ("last.pt", "last.json", ".last.pt.tmp"):  # a killed save leaves its temp
        (ours / name).write_bytes(b"x")
    checkpoint.remove_checkpoint_dir(ours)
    assert not ours.exists()
    checkpoint.remove_checkpoint_dir(ours)  # absent: nothing to do
    theirs = tmp_path / "thesis.ckpt"
    theirs.mkdir()
    (theirs / "last.pt").write_bytes(b"x")
    (theirs / "chapter1.tex").write_text("keep me")
    link = tmp_path / "link.ckpt"
    link.symlink_to(ours.parent)
    for path in (theirs, link):
        with pytest.raises(WasiToolError, match="is not a wasi-tool checkpoint"):
            checkpoint.remove_checkpoint_dir(path)
    assert (theirs / "chapter1.tex").read_text() == "keep me" and link.is_symlink()
