"""The allocator a training process runs on (wasi_tool/allocator.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from wasi_tool.allocator import JEMALLOC_CONF, find_library, in_use, worker_env
from wasi_tool.bench.train import TrainBenchConfig
from wasi_tool.errors import WasiToolError
from wasi_tool.threads import AUTO_WAIT_POLICY

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux allocators")
# every worker environment carries the OpenMP wait policy too (the tool's default here)
W = {"OMP_WAIT_POLICY": AUTO_WAIT_POLICY}


@linux
def test_auto_preloads_an_installed_allocator_for_every_worker(tmp_path, monkeypatch):
    monkeypatch.setattr("wasi_tool.allocator._DIRS", ())  # only the libraries made here
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    monkeypatch.setenv("WASI_TOOL_ALLOCATOR_PATH", str(tmp_path))
    monkeypatch.setenv("LD_PRELOAD", "/x/libother.so")
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env, name = worker_env("auto")
    assert name == "tcmalloc"
    assert env == {**W, "LD_PRELOAD": f"{lib} /x/libother.so"}  # the user's preload is kept
    # vanilla or a run without a memory mode too (bench --train's workers): the same preload
    vanilla = TrainBenchConfig(arch="vit_tiny_patch16_224", random_init=True, method="vanilla")
    assert not vanilla.saves_memory
    assert worker_env(vanilla.allocator) == (env, "tcmalloc")
    assert worker_env("system") == (W, "system")
    # with both installed, tcmalloc comes first (the faster step at about the same peak)
    jemalloc = tmp_path / "libjemalloc.so.2"
    jemalloc.write_bytes(b"")
    assert worker_env("auto")[1] == "tcmalloc"
    # jemalloc alone, or named: with its measured decay
    lib.unlink()
    env, name = worker_env("auto")
    assert name == "jemalloc"
    assert env == {**W, "LD_PRELOAD": f"{jemalloc} /x/libother.so", "MALLOC_CONF": JEMALLOC_CONF}
    monkeypatch.setenv("MALLOC_CONF", "narenas:1")  # the user's own settings win
    assert "MALLOC_CONF" not in worker_env("jemalloc")[0]


def test_a_named_allocator_that_is_missing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("wasi_tool.allocator._DIRS", ())
    monkeypatch.setenv("WASI_TOOL_ALLOCATOR_PATH", str(tmp_path))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert find_library("jemalloc") is None
    with pytest.raises(WasiToolError, match="apt install libjemalloc2"):
        worker_env("jemalloc")
    assert worker_env("auto") == (W, "system")
    with pytest.raises(WasiToolError, match="allocator must be one of"):
        TrainBenchConfig(arch="vit_tiny_patch16_224", random_init=True, allocator="mimalloc")


@linux
def test_the_worker_environment_really_runs_on_the_allocator():
    env, name = worker_env("auto")  # tcmalloc, jemalloc, or glibc when neither is there
    code = (
        "import json; from wasi_tool.allocator import in_use, follow_live_memory;"
        "print(json.dumps([in_use(), follow_live_memory()]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    used, followed = json.loads(out.stdout)
    if name in ("jemalloc", "tcmalloc"):
        assert used == followed == name
    else:  # glibc: the mmap threshold is fixed instead
        assert used == "glibc"
        assert followed == "glibc, 64 KiB mmap threshold"


def test_this_process_reports_its_allocator():
    assert in_use() in {"glibc", "tcmalloc", "jemalloc", "system"}
