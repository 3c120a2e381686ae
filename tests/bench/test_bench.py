"""bench: percentile maths, profiles, the JSON schema, local and SSH runs, bad inputs."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from wasi_tool.bench import (
    InferenceBenchConfig,
    SSHTarget,
    TrainBenchConfig,
    get_profile,
    run_inference_bench,
    run_train_bench,
)
from wasi_tool.bench.runner import SCHEMA, percentile, summarise
from wasi_tool.errors import WasiToolError

QUICK = InferenceBenchConfig(batch_size=2, warmup=1, repeats=5)


def test_percentiles_on_known_samples() -> None:
    samples = [float(v) for v in range(1, 11)]
    assert percentile(samples, 0) == 1.0 and percentile(samples, 100) == 10.0
    assert percentile(samples, 50) == 5.5
    assert percentile(samples, 90) == pytest.approx(9.1)
    assert percentile([7.0], 99) == 7.0
    rng = np.random.default_rng(0)
    for q in (50, 90, 95, 99):
        data = rng.exponential(size=37).tolist()
        assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)))
    stats = summarise([10.0, 20.0, 30.0], batch=4)
    assert stats["p50_ms"] == 20.0 and stats["mean_ms"] == 20.0
    assert stats["images_per_second"] == pytest.approx(200.0)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_profiles() -> None:
    pi5 = get_profile("pi5")
    assert (pi5.threads, pi5.execution_mode, pi5.graph_opt) == (4, "sequential", "all")
    assert "Cortex-A76" in pi5.description
    assert get_profile("host").resolved_threads() == os.cpu_count()
    assert {"pi4", "jetson-orin-cpu"} <= set(__import__("wasi_tool.bench").bench.PROFILES)
    with pytest.raises(WasiToolError, match="unknown device profile 'pi9'"):
        get_profile("pi9")


def test_local_run_and_json_schema(tmp_path: Path, tiny_onnx: Callable[..., Path]) -> None:
    a = tiny_onnx(tmp_path / "a.onnx")
    b = tiny_onnx(tmp_path / "b.onnx", seed=1)
    result = run_inference_bench(a, b, get_profile("pi5"), QUICK)
    assert result["schema"] == SCHEMA
    assert (result["batch"], result["threads"], result["repeats"]) == (2, 4, 5)
    assert result["ran_on"]["where"] == "host" and "not a pi5" in result["ran_on"]["note"]
    assert result["profile"]["name"] == "pi5" and result["peak_rss_bytes"] > 0
    for key, path in (("a", a), ("b", b)):
        m = result["models"][key]
        assert m["path"] == str(path) and m["file_bytes"] == path.stat().st_size
        assert len(m["latencies_ms"]) == 5
        assert (
            m["min_ms"] <= m["p50_ms"] <= m["p90_ms"] <= m["p95_ms"] <= m["p99_ms"] <= m["max_ms"]
        )
    assert set(result["ratios"]) == {"p50_speedup_vs", "file_size_ratio_vs"}
    # 4 threads on a host with fewer cores is said, not silent
    cpus = result["machine"]["cpus"]
    if cpus < 4:
        assert f"runs 4 threads on a machine with {cpus} cores" in result["warnings"][0]
    else:
        assert "warnings" not in result


def test_bad_models(tmp_path: Path) -> None:
    with pytest.raises(WasiToolError, match="no such ONNX file"):
        run_inference_bench(tmp_path / "none.onnx", None, get_profile("host"), QUICK)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(2000))
    with pytest.raises(WasiToolError, match="not a readable ONNX model"):
        run_inference_bench(junk, None, get_profile("host"), QUICK)


@pytest.mark.parametrize(
    "text", ["", "a b@host", "user@", "-oProxyCommand=x", "u@h:99999", "u@h:p"]
)
def test_ssh_target_parsing_rejects(text: str) -> None:
    with pytest.raises(WasiToolError):
        SSHTarget.parse(text)


def test_ssh_target_parsing() -> None:
    t = SSHTarget.parse("pi@raspberrypi.local:2222")
    assert (t.user, t.host, t.port, t.destination) == (
        "pi",
        "raspberrypi.local",
        2222,
        "pi@raspberrypi.local",
    )
    assert SSHTarget.parse("[::1]:22").host == "::1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_host_is_a_clear_error(tmp_path: Path, tiny_onnx: Callable[..., Path]) -> None:
    if shutil.which("ssh") is None:
        pytest.skip("no ssh client")
    target = SSHTarget("127.0.0.1", getpass.getuser(), _free_port(), known_hosts=tmp_path / "kh")
    with pytest.raises(WasiToolError, match=r"ssh to .*127\.0\.0\.1 failed"):
        run_inference_bench(tiny_onnx(tmp_path / "a.onnx"), None, get_profile("pi5"), QUICK, target)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """A real sshd on 127.0.0.1 (a free port), keys generated here; .ci/run installs it."""
    if not Path("/usr/sbin/sshd").exists() or shutil.which("ssh-keygen") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install openssh-server (see .ci/run)")
        pytest.skip("openssh-server is not installed")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True
        )
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    proc = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE
    )
    host_key = (d / "host.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    deadline = time.time() + 20
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"sshd did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
    yield {"port": port, "key": d / "client", "known_hosts": d / "known_hosts", "dir": d}
    proc.terminate()
    proc.wait(timeout=10)


def _target(sshd: dict[str, object], python: str = sys.executable) -> SSHTarget:
    return SSHTarget(
        "127.0.0.1", getpass.getuser(), int(sshd["port"]), Path(sshd["key"]),  # type: ignore[arg-type]
        Path(sshd["known_hosts"]), timeout=120, python=python,  # type: ignore[arg-type]
    )  # fmt: skip


def test_ssh_run_against_a_local_sshd(
    sshd: dict[str, object], tmp_path: Path, tiny_onnx: Callable[..., Path]
) -> None:
    odd = tmp_path / "my model; touch PWNED $(id).onnx"  # spaces and shell metacharacters
    tiny_onnx(odd)
    b = tiny_onnx(tmp_path / "b.onnx", seed=1)
    result = run_inference_bench(odd, b, get_profile("pi5"), QUICK, _target(sshd))
    assert result["ran_on"]["where"] == "ssh"
    assert result["ran_on"]["destination"].endswith("@127.0.0.1")
    assert result["threads"] == 4 and result["models"]["a"]["path"] == str(odd)
    assert result["models"]["a"]["p50_ms"] > 0 and "ratios" in result
    assert not list(tmp_path.glob("PWNED*")) and not Path("PWNED").exists()


def test_ssh_reports_a_missing_onnxruntime(
    sshd: dict[str, object], tmp_path: Path, tiny_onnx: Callable[..., Path]
) -> None:
    no_ort = tmp_path / "python-without-ort"
    no_ort.write_text(
        "#!/bin/sh\necho \"ModuleNotFoundError: No module named 'onnxruntime'\" >&2\nexit 1\n"
    )
    no_ort.chmod(0o755)
    with pytest.raises(WasiToolError, match="onnxruntime is not installed"):
        run_inference_bench(
            tiny_onnx(tmp_path / "a.onnx"),
            None,
            get_profile("pi5"),
            QUICK,
            _target(sshd, str(no_ort)),
        )


def test_ssh_host_key_is_checked(
    sshd: dict[str, object], tmp_path: Path, tiny_onnx: Callable[..., Path]
) -> None:
    wrong = tmp_path / "known_hosts"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True
    )
    other = (tmp_path / "other.pub").read_text().split()
    wrong.write_text(f"[127.0.0.1]:{sshd['port']} {other[0]} {other[1]}\n")
    target = SSHTarget("127.0.0.1", getpass.getuser(), int(sshd["port"]), Path(sshd["key"]), wrong)  # type: ignore[arg-type]
    with pytest.raises(WasiToolError, match="failed"):
        run_inference_bench(tiny_onnx(tmp_path / "a.onnx"), None, get_profile("pi5"), QUICK, target)


@pytest.mark.slow
def test_train_bench_schema() -> None:
    cfg = TrainBenchConfig(
        random_init=True, arch="vit_tiny_patch16_224", img_size=32, num_classes=10,
        method="wasi,bsr,lora", batch_size=32, steps=2, warmup=1,
    )  # fmt: skip
    result = run_train_bench(cfg, vs="vanilla").to_dict()
    assert list(result["methods"]) == ["wasi", "bsr", "lora", "vanilla"]
    assert set(result["ratios_by_method"]) == {"wasi", "bsr", "lora"}
    bsr, lora = result["methods"]["bsr"], result["methods"]["lora"]
    assert bsr["bsr"]["trained_blocks"] == [3, 7, 11] and bsr["targets"] == 6
    assert lora["trainable_parameters"] == 24 * 8 * (768 + 192) + 10 * 192 + 10
    assert bsr["saved_bytes_total"] < result["methods"]["vanilla"]["saved_bytes_total"]
    wasi, vanilla = result["methods"]["wasi"], result["methods"]["vanilla"]
    assert wasi["input"] == [32, 3, 32, 32] and wasi["targets"] == 24
    assert wasi["act_ranks_first_target"] == [8, 1, 32]  # (B/4, N/4, min(32, C)) for (32, 5, 192)
    assert wasi["saved_bytes_targets"] < vanilla["saved_bytes_targets"]
    assert set(result["ratios"]) >= {"step_speedup_vs", "peak_rss_ratio_vs", "saved_bytes_ratio_vs"}
    with pytest.raises(WasiToolError, match="unknown method"):
        run_train_bench(cfg, vs="sgd")
