"""A real deployment on loopback: a Flower SuperLink and two SuperNodes as separate processes on
127.0.0.1, ``flwr run`` of deploy/flower (the wasi-tool ServerApp/ClientApp), two rounds; the
artifact it writes exports to ONNX."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wasi_tool.artifact import read_manifest
from wasi_tool.cli.app import app
from wasi_tool.models.loading import ModelSource
from wasi_tool.stages.compress import CompressConfig, run_compress

pytest.importorskip("flwr")

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tool(name: str) -> str:
    found = BIN / name
    if not found.exists():
        pytest.skip(f"{name} is not installed")
    return str(found)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path, int]]:
    """A SuperLink and two SuperNodes (partition 0 and 1 of 2), killed at teardown, also when
    the test fails. Yields the environment, the log folder and the SuperLink's port."""
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> None:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                args,
                env=env,
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log.close()

    try:
        start(
            "superlink",
            _tool("flower-superlink"),
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        )
        for k in range(2):
            start(
                f"supernode{k}",
                _tool("flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--port",
                str(_free_port()),
                "--node-config",
                f"partition-id={k} num-partitions=2",
            )
        yield env, tmp_path, port
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.slow
def test_two_rounds_on_loopback_write_an_artifact_that_exports(fleet, tmp_path: Path) -> None:
    env, logs, port = fleet
    model = tmp_path / "tiny-c"
    source = ModelSource(random_init=True, arch="vit_tiny_patch16_224", img_size=32, seed=0)
    run_compress(source, CompressConfig(targets="mlp", eps=0.8), model)
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps({"method": "wasi", "clients": 2, "rounds": 2, "batch_size": 32, "max_steps": 1})
    )
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    shutil.copy(REPO / "deploy" / "flower" / "pyproject.toml", app_dir)
    home = Path(env["FLWR_HOME"])
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n'
        f'[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    out = tmp_path / "fed"
    run_config = f"model='{model}' data='digits' out='{out}' settings='{settings}'"
    # --stream returns when the ServerApp has finished; the timeout only guards against a hang
    done = subprocess.run(
        [_tool("flwr"), "run", ".", "local", "--stream", "--run-config", run_config],
        cwd=app_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    tail = "\n".join(
        f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:]
        for p in sorted(logs.glob("*.log"))
    )
    assert done.returncode == 0, done.stdout + done.stderr + tail
    history = read_manifest(out)["federated"]["history"]
    assert [row["round"] for row in history] == [1, 2], tail
    assert all(row["accepted"] == 2 for row in history)
    assert sorted(int(c["partition_id"]) for c in history[0]["clients"]) == [0, 1]
    result = CliRunner().invoke(app, ["export", str(out), "--onnx", "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "x" / "model.onnx").exists()
