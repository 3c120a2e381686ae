"""doctor: /proc/cpuinfo parsing, the known-bad table, the SIGILL report, the CLI, SSH.

The Pi texts in tests/fixtures/cpuinfo are a Raspberry Pi 4's (Cortex-A72, CPU part 0xd08,
ARMv8.0: no LSE atomics, no fp16, no dotprod) and a Pi 5's (Cortex-A76, 0xd0b, ARMv8.2-A).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.bench.test_bench import _target, sshd  # noqa: F401  (the loopback sshd fixture)
from wasi_tool import device
from wasi_tool.bench import SSHTarget, get_profile
from wasi_tool.cli.app import app
from wasi_tool.doctor import (
    KNOWN_BAD,
    ORT_FIX,
    TORCH_FIX,
    diagnose,
    parse_assume,
    parse_cpuinfo,
    run_doctor,
)
from wasi_tool.errors import WasiToolError

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "cpuinfo"
PI4 = (FIXTURES / "pi4.txt").read_text()
PI5 = (FIXTURES / "pi5.txt").read_text()
X86 = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sse sse2 avx avx2 avx512f

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sse sse2 avx avx2 avx512f
"""


def _judge(cpuinfo: str, assume: str) -> Any:
    return diagnose({}, "test", cpuinfo, parse_assume(assume))


def _problems(report: Any) -> list[str]:
    return [f.text for f in report.problems]


def test_parse_pi4_and_pi5() -> None:
    pi4, pi5 = parse_cpuinfo(PI4), parse_cpuinfo(PI5)
    assert (pi4.arch, pi4.model, pi4.part, pi4.processors) == ("aarch64", "Cortex-A72", "0xd08", 4)
    assert pi4.board == "Raspberry Pi 4 Model B Rev 1.4"
    assert pi4.flags == ("fp", "asimd", "evtstrm", "crc32", "cpuid")
    assert not any(pi4.arm_features.values())
    assert pi4.isa() == "ARMv8.0 (no LSE atomics)"
    assert (pi5.model, pi5.part) == ("Cortex-A76", "0xd0b")
    assert pi5.arm_features == {
        "atomics": True, "asimddp": True, "fphp": True, "asimdhp": True,
        "bf16": False, "i8mm": False, "sve": False,
    }  # fmt: skip
    assert pi5.isa() == "ARMv8.2-A or later"


def test_parse_x86_and_unknown() -> None:
    x86 = parse_cpuinfo(X86)
    assert (x86.arch, x86.model, x86.processors) == ("x86_64", "Intel(R) Xeon(R) Processor", 2)
    assert "avx2" in x86.flags
    assert parse_cpuinfo("", "riscv64").arch == "riscv64"
    unknown = parse_cpuinfo("processor : 0\nCPU implementer : 0x51\nCPU part : 0x802\n")
    assert unknown.arch == "aarch64" and "0x802" in unknown.model


def test_torch_2_10_is_refused_on_a_pi4_with_the_fix_and_passes_on_a_pi5() -> None:
    pi4 = _judge(PI4, "torch==2.10.1")
    assert not pi4.ok
    (bad,) = pi4.problems
    assert bad.text.startswith("torch 2.10.1 crashes on ARMv8.0 (no LSE atomics): SIGILL at import")
    assert bad.fix == TORCH_FIX == "pip install 'torch==2.9.1' 'torchvision==0.24.1'"
    assert "https://github.com/pytorch/pytorch/issues/174344" in bad.links
    assert "https://github.com/pytorch/pytorch/issues/176993" in bad.links
    assert _judge(PI5, "torch==2.10.1").ok
    assert _judge(PI4, "torch==2.10.0").problems[0].fix == TORCH_FIX


def test_onnxruntime_1_21_0_is_refused_on_a_pi4_only() -> None:
    pi4 = _judge(PI4, "onnxruntime==1.21.0")
    (bad,) = pi4.problems
    assert "onnxruntime 1.21.0 crashes on ARMv8.0" in bad.text and "fp16" in bad.text
    assert bad.fix == ORT_FIX
    assert bad.links == ("https://github.com/microsoft/onnxruntime/issues/23957",)
    assert _judge(PI5, "onnxruntime==1.21.0").ok
    assert _judge(PI4, "onnxruntime==1.21.1").ok  # measured under cortex-a72
    assert _judge(PI4, "onnxruntime==1.22.0").ok


@pytest.mark.parametrize(
    ("version", "pi4_ok"),
    [
        ("2.4.0", False), ("2.4.1", True), ("2.5.1", True), ("2.6.0", False), ("2.7.1", True),
        ("2.8.0", True), ("2.9.1", True), ("2.10.0", False), ("2.11.0", False),
        ("2.14.1", False), ("2.15.0", False),
    ],
)  # fmt: skip
def test_the_torch_table_matches_the_measurements(version: str, pi4_ok: bool) -> None:
    """Each release as the emulated cortex-a72 / a76 runs found it (docs/raspberry-pi.md)."""
    assert _judge(PI4, f"torch=={version}").ok is pi4_ok
    assert _judge(PI5, f"torch=={version}").ok


def test_cuda_builds_and_cpu_builds_from_2_11() -> None:
    pi4 = _judge(PI4, "torch==2.14.1")
    assert "CUDA builds with NVPL BLAS" in pi4.problems[0].text
    # a CPU build of the same release (PyTorch's CPU index) is not PyPI's NVPL build
    cpu_build = _judge(PI4, "torch==2.14.1+cpu")
    assert cpu_build.ok
    assert any("is a CPU build" in f.text for f in cpu_build.findings)
    pi5 = _judge(PI5, "torch==2.14.1")
    assert pi5.ok and any("CUDA build" in f.text and f.level == "note" for f in pi5.findings)


def test_mimalloc_is_named_from_torch_2_10_on_aarch64_only() -> None:
    def allocator_notes(cpuinfo: str, assume: str) -> list[str]:
        report = _judge(cpuinfo, assume)
        return [f.text for f in report.findings if f.topic == "allocator"]

    assert any("mimalloc" in t for t in allocator_notes(PI5, "torch==2.11.0"))
    assert not allocator_notes(PI5, "torch==2.9.1")
    assert not allocator_notes(X86, "torch==2.14.1")


def test_x86_is_not_an_arm_device() -> None:
    report = _judge(X86, "torch==2.10.1,onnxruntime==1.21.0")
    assert report.ok
    assert "not an ARM device" in report.findings[0].text


def test_table_rows_are_well_formed() -> None:
    for row in KNOWN_BAD:
        assert row.package in device.PACKAGES and row.needs and row.links and row.fix
        assert row.end is None or row.end > row.first
    assert [r.versions() for r in KNOWN_BAD if r.package == "torch"] == [
        "2.4.0", "2.6.0", "2.10.x", ">= 2.11",
    ]  # fmt: skip


@pytest.mark.parametrize("text", ["torch>=2.10", "tensorflow==2.0", "torch==abc", "", "torch=2.1"])
def test_assume_is_checked(text: str) -> None:
    with pytest.raises(WasiToolError, match="--assume"):
        parse_assume(text)


def test_a_sigill_in_the_check_is_a_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real subprocess killed by SIGILL (what a wheel for a newer CPU does) is reported as
    such, with the stage it reached, and makes the report fail."""
    monkeypatch.setitem(
        device._CHECKS,
        "numpy",
        "import os, signal\nprint('stage matmul', flush=True)\nos.kill(os.getpid(), signal.SIGILL)",
    )
    check = device.run_check("numpy", timeout=60)
    assert check["signal"] == "SIGILL" and check["stage"] == "matmul"
    assert check["returncode"] == -signal.SIGILL
    probe = {"machine": "aarch64", "cpuinfo": PI4, "packages": {"numpy": "2.4.6"}}
    report = diagnose({**probe, "checks": {"numpy": check}}, "test")
    assert _problems(report) == [
        "numpy 2.4.6 dies with SIGILL (illegal instruction) on this CPU (at the first matmul)"
    ]


def test_an_import_error_in_the_check_is_a_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(device._CHECKS, "numpy", "import no_such_module_here")
    check = device.run_check("numpy", timeout=60)
    assert not check["ok"] and check["signal"] is None and "no_such_module_here" in check["error"]
    report = diagnose({"cpuinfo": X86, "packages": {}, "checks": {"numpy": check}}, "test")
    assert "numpy ? fails" in _problems(report)[0]


def test_the_real_checks_pass_here() -> None:
    """numpy's real check, in a fresh process of this Python."""
    check = device.run_check("numpy", timeout=300)
    assert check["ok"], check
    assert check["info"]["version"] == device.installed_versions(("numpy",))["numpy"]


def test_probe_reads_this_machine() -> None:
    facts = device.probe(checks=False, libraries={"jemalloc": ["/nonexistent/libjemalloc.so.2"]})
    assert facts["schema"] == device.SCHEMA
    assert facts["python_bits"] == 64 and facts["cpu_count"] >= 1
    assert facts["memory"]["MemTotal"] > 0
    assert facts["allocator_libraries"] == {"jemalloc": None}
    assert facts["checks"] == {}


def test_cli_refuses_a_known_bad_version_with_the_fix() -> None:
    result = CliRunner().invoke(
        app,
        ["doctor", "--cpuinfo", str(FIXTURES / "pi4.txt"), "--assume", "torch==2.10.1"],
    )
    assert result.exit_code == 1, result.output
    assert "torch 2.10.1 crashes on ARMv8.0 (no LSE atomics)" in result.output
    assert "fix: pip install 'torch==2.9.1' 'torchvision==0.24.1'" in result.output
    ok = CliRunner().invoke(
        app, ["doctor", "--cpuinfo", str(FIXTURES / "pi5.txt"), "--assume", "torch==2.10.1"]
    )
    assert ok.exit_code == 0, ok.output
    assert "Cortex-A76 (Raspberry Pi 5 Model B Rev 1.0)" in ok.output


def test_cli_json(tmp_path: Path) -> None:
    out = tmp_path / "doctor.json"
    argv = ["doctor", "--cpuinfo", str(FIXTURES / "pi4.txt"), "--assume", "onnxruntime==1.21.0"]
    result = CliRunner().invoke(app, [*argv, "--json", str(out)])
    assert result.exit_code == 1
    data = json.loads(out.read_text())
    assert data["schema"] == "wasi-tool-doctor/1" and data["ok"] is False
    assert data["cpu"]["part"] == "0xd08" and data["cpu"]["arm_features"]["atomics"] is False
    assert data["findings"][1]["fix"] == ORT_FIX
    stdout = CliRunner().invoke(app, [*argv, "--json", "-"])
    assert json.loads(stdout.stdout)["versions"] == {"onnxruntime": "1.21.0"}


def test_cli_bad_inputs(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("hello\n")
    for argv in (
        ["--cpuinfo", str(tmp_path / "missing.txt")],
        ["--cpuinfo", str(tmp_path / "empty.txt")],
        ["--assume", "torch>=2"],
        ["--ssh", "-oProxyCommand=x"],
        ["--packages", "torch,tensorflow"],
    ):
        result = CliRunner().invoke(app, ["doctor", *argv])
        assert result.exit_code == 1
        assert result.output.count("\n") == 1 and result.output.startswith("error: ")


@pytest.mark.slow
def test_python_m_wasi_tool_doctor_does_not_import_torch(tmp_path: Path) -> None:
    """Where torch dies at import, doctor must still answer: its entry loads no torch."""
    out = tmp_path / "d.json"
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['wasi_tool', 'doctor', '--cpuinfo', {str(FIXTURES / 'pi4.txt')!r}, "
        f"'--assume', 'torch==2.10.1', '--json', {str(out)!r}]\n"
        "try:\n    runpy.run_module('wasi_tool', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print(code, 'torch' in sys.modules, 'onnxruntime' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.stdout.split()[-3:] == ["1", "False", "False"], proc.stderr
    assert json.loads(out.read_text())["ok"] is False


@pytest.mark.slow
def test_doctor_over_ssh(sshd: dict[str, object]) -> None:  # noqa: F811
    """The probe is copied to the device and run with its python3 (loopback sshd)."""
    report = run_doctor(assume={"torch": "2.10.1"}, ssh=_target(sshd))
    assert report.source.endswith("over SSH")
    assert report.facts["python"] and report.facts["memory"]["MemTotal"] > 0
    assert report.facts["checks"] == {}  # --assume: no import checks
    local = run_doctor(assume={"torch": "2.10.1"})
    assert report.cpu == local.cpu  # loopback: the same machine
    assert report.ok is local.ok


def test_profiles_know_their_cpu_part() -> None:
    pi4, pi5, host = get_profile("pi4"), get_profile("pi5"), get_profile("host")
    assert pi4.is_this(parse_cpuinfo(PI4).part) and not pi4.is_this(parse_cpuinfo(PI5).part)
    assert pi5.is_this("0xd0b") and not pi5.is_this(None)
    assert host.is_this(None) and host.is_this("0xd08")


def test_ssh_target_keeps_the_remote_python() -> None:
    target = SSHTarget.parse("pi@raspberrypi:2222", python="/home/pi/venv/bin/python")
    assert (target.user, target.host, target.port) == ("pi", "raspberrypi", 2222)
    assert target.python == "/home/pi/venv/bin/python"


@pytest.mark.slow
@pytest.mark.parametrize(("cpuinfo", "is_pi5"), [(PI5, True), (PI4, False)])
def test_bench_on_an_arm_host_records_the_device(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tiny_onnx: Callable[..., Path],
    cpuinfo: str,
    is_pi5: bool,
) -> None:
    """bench --device pi5 on an aarch64 host: the JSON has the CPU and doctor's findings, and
    the note says whether this host is a Pi 5 (a Pi 4 is not)."""
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    real_read = device._read
    monkeypatch.setattr(
        device, "_read", lambda path: cpuinfo if path == "/proc/cpuinfo" else real_read(path)
    )
    model, out = tiny_onnx(tmp_path / "m.onnx"), tmp_path / "b.json"
    argv = ["bench", str(model), "--device", "pi5", "--repeats", "2", "--warmup", "0"]
    result = CliRunner().invoke(app, [*argv, "--json", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    dev = record["device"]
    assert dev["cpu"]["model"] == ("Cortex-A76" if is_pi5 else "Cortex-A72")
    assert dev["is_profile_device"] is is_pi5
    assert "flags" in dev["cpu"] and dev["findings"][0].startswith("ok: cpu: Cortex-A7")
    note = record["ran_on"]["note"]
    assert note.startswith("this host, a pi5") if is_pi5 else note.endswith("not a pi5")


@pytest.mark.slow
def test_bench_on_x86_says_it_is_not_the_device(
    tmp_path: Path, tiny_onnx: Callable[..., Path]
) -> None:
    if platform.machine() == "aarch64":
        pytest.skip("an x86 host's case")
    model, out = tiny_onnx(tmp_path / "m.onnx"), tmp_path / "b.json"
    argv = ["bench", str(model), "--device", "pi4", "--repeats", "2", "--warmup", "0"]
    result = CliRunner().invoke(app, [*argv, "--json", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert "device" not in record
    assert record["ran_on"]["note"] == "this host with the pi4 profile's settings, not a pi4"


@pytest.mark.slow
def test_bench_over_ssh_records_the_device(
    sshd: dict[str, object],  # noqa: F811
    tmp_path: Path,
    tiny_onnx: Callable[..., Path],
) -> None:
    model, out = tiny_onnx(tmp_path / "m.onnx"), tmp_path / "b.json"
    target = _target(sshd)
    argv = [
        "bench", str(model), "--device", "pi5", "--repeats", "2", "--warmup", "0",
        "--ssh", f"{target.destination}:{target.port}", "--ssh-key", str(target.key),
        "--known-hosts", str(target.known_hosts), "--remote-python", sys.executable,
        "--json", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["ran_on"]["where"] == "ssh"
    assert record["device"]["source"].endswith("over SSH")
    assert record["device"]["cpu"]["arch"] == platform.machine()
    assert record["device"]["is_profile_device"] is (
        parse_cpuinfo(Path("/proc/cpuinfo").read_text()).part == "0xd0b"
    )


def _same_table(a: dict[str, Any], b: dict[str, Any]) -> None:
    """The columns of the training table that do not depend on timing."""
    assert a["methods"].keys() == b["methods"].keys()
    for name in a["methods"]:
        x, y = a["methods"][name], b["methods"][name]
        for key in ("memory_mode", "act_ranks_first_target", "input", "saved_bytes_total"):
            assert x[key] == y[key], (name, key)
        assert x["saved_bytes_targets"] == y["saved_bytes_targets"]


@pytest.mark.slow
def test_bench_train_over_ssh_gives_the_local_table(
    sshd: dict[str, object],  # noqa: F811
    tmp_path: Path,
) -> None:
    """bench --train --ssh copies the checkpoint, the device's wasi-tool runs the training
    bench, and the table is the local run's (loopback sshd; the device's python is this one
    with this checkout on its path)."""
    import safetensors.torch
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    ckpt = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    remote_python = tmp_path / "python.sh"
    remote_python.write_text(
        f'#!/bin/sh\nPYTHONPATH={REPO} OMP_NUM_THREADS=1 exec {sys.executable} "$@"\n'
    )
    remote_python.chmod(0o755)
    target = _target(sshd)
    common = [
        "bench", "--train", str(ckpt), "--arch", "vit_tiny_patch16_224", "--img-size", "32",
        "--num-classes", "10", "--method", "wasi", "--steps", "2", "--warmup", "1",
        "--batch-size", "8", "--threads", "1",
    ]  # fmt: skip
    ssh = [
        "--ssh", f"{target.destination}:{target.port}", "--ssh-key", str(target.key),
        "--known-hosts", str(target.known_hosts), "--remote-python", str(remote_python),
    ]  # fmt: skip
    local = CliRunner().invoke(app, [*common, "--json", str(tmp_path / "local.json")])
    assert local.exit_code == 0, local.output
    remote = CliRunner().invoke(app, [*common, *ssh, "--json", str(tmp_path / "ssh.json")])
    assert remote.exit_code == 0, remote.output
    assert f"ran on: {target.destination} over SSH" in remote.output
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "ssh"))
    _same_table(a, b)
    assert b["config"]["checkpoint"].endswith("/checkpoint.safetensors")  # the copy there
    assert b["device"]["source"].endswith("over SSH")


@pytest.mark.slow
def test_bench_train_over_ssh_without_wasi_tool_there_is_one_line(
    sshd: dict[str, object],  # noqa: F811
    tmp_path: Path,
) -> None:
    bare = tmp_path / "bare.sh"  # a python without site-packages: no wasi-tool
    bare.write_text(f'#!/bin/sh\ncd /\nPYTHONPATH= exec {sys.executable} -I -S "$@"\n')
    bare.chmod(0o755)
    target = _target(sshd)
    argv = [
        "bench", "--train", "--random-init", "--arch", "vit_tiny_patch16_224",
        "--ssh", f"{target.destination}:{target.port}", "--ssh-key", str(target.key),
        "--known-hosts", str(target.known_hosts), "--remote-python", str(bare),
    ]  # fmt: skip
    failed = CliRunner().invoke(app, argv)
    assert failed.exit_code == 1
    assert failed.output.strip().splitlines()[-1] == (
        f"error: the training bench failed on {target.destination}: "
        f"wasi-tool is not installed for {bare} there"
    )
