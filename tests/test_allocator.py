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
def test_auto_preloads_an_installed_allocator_only_when_saving_memory(tmp_path, monkeypatch):
    monkeypatch.setattr("wasi_tool.allocator._DIRS", ())  # only the libraries made here
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    monkeypatch.setenv("WASI_TOOL_ALLOCATOR_PATH", str(tmp_path))
    monkeypatch.setenv("LD_PRELOAD", "/x/libother.so")
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env, name = worker_env("auto", memory_saving=True)
    assert name == "tcmalloc"
    assert env == {**W, "LD_PRELOAD": f"{lib} /x/libother.so"}  # the user's preload is kept
    assert worker_env("auto", memory_saving=False) == (W, "system")
    assert worker_env("system", memory_saving=True) == (W, "system")
    # with both installed, tcmalloc comes first (the faster step at about the same peak)
    jemalloc = tmp_path / "libjemalloc.so.2"
    jemalloc.write_bytes(b"")
    assert worker_env("auto", memory_saving=True)[1] == "tcmalloc"
    # jemalloc alone, or named: with its measured decay
    lib.unlink()
    env, name = worker_env("auto", memory_saving=True)
    assert name == "jemalloc"
    assert env == {**W, "LD_PRELOAD": f"{jemalloc} /x/libother.so", "MALLOC_CONF": JEMALLOC_CONF}
    monkeypatch.setenv("MALLOC_CONF", "narenas:1")  # the user's own settings win
    assert "MALLOC_CONF" not in worker_env("jemalloc", memory_saving=True)[0]


def test_a_named_allocator_that_is_missing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("wasi_tool.allocator._DIRS", ())
    monkeypatch.setenv("WASI_TOOL_ALLOCATOR_PATH", str(tmp_path))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert find_library("jemalloc") is None
    with pytest.raises(WasiToolError, match="apt install libjemalloc2"):
        worker_env("jemalloc", memory_saving=True)
    assert worker_env("auto", memory_saving=True) == (W, "system")
    with pytest.raises(WasiToolError, match="allocator must be one of"):
        TrainBenchConfig(arch="vit_tiny_patch16_224", random_init=True, allocator="mimalloc")


@linux
def test_the_worker_environment_really_runs_on_the_allocator():
    env, name = worker_env("auto", True)  # jemalloc, tcmalloc, or glibc when neither is there
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
