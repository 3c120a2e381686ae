"""Start-up: the CLI parses before it imports (no torch for --help, --version, usage errors or a
command's own --help), its torch-free copy of the config defaults matches the dataclasses, and
the OpenMP wait policy is set before torch loads, reaches the bench's workers and their JSON.
Import checks only: nothing here is timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from wasi_tool.cli import defaults
from wasi_tool.cli.app import app
from wasi_tool.errors import WasiToolError
from wasi_tool.threads import AUTO_WAIT_POLICY, set_wait_policy, wait_policy, wait_policy_env

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "timm", "transformers", "numpy", "safetensors")

# In a fresh interpreter: every invocation below in turn (typer's own exit codes kept), each
# followed by the heavy modules imported so far; the command names are read from the app, so
# a new command is checked too.
PROBE = """
import json, sys
{before}
import typer
from wasi_tool.cli.app import app
names = sorted(typer.main.get_command(app).commands)
runs = [["--help"], ["--version"], ["no-such-command"], ["finetune", "--no-such-flag"],
        ["bench", "--threads", "many"]] + [[n, "--help"] for n in names]
seen = []
for args in runs:
    try:
        app(args, prog_name="wasi-tool")
        code = 0
    except SystemExit as stop:
        code = stop.code
    seen.append([args, code, [m for m in {heavy!r} if m in sys.modules]])
print(json.dumps([names, seen]), file=sys.__stderr__)
"""


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )


def _probe(before: str = "") -> tuple[list[str], list[Any]]:
    proc = _python("-c", PROBE.format(before=before, heavy=HEAVY))
    assert proc.returncode == 0, proc.stderr[-3000:]
    names, seen = json.loads(proc.stderr.strip().splitlines()[-1])
    return names, seen


def test_the_probe_sees_torch_when_it_is_imported() -> None:
    """The check can fail: torch imported in the child is reported."""
    _, seen = _probe(before="import torch")
    assert all("torch" in heavy for _, _, heavy in seen)


def test_help_version_usage_errors_and_every_command_help_import_no_torch() -> None:
    names, seen = _probe()
    assert {"finetune", "compress", "bench", "export", "run", "info", "eval"} <= set(names)
    codes = {" ".join(args): code for args, code, _ in seen}
    assert codes["--help"] == 0 and codes["--version"] == 0 and codes["finetune --help"] == 0
    # usage errors are click's (exit 2), found before anything is imported
    assert codes["no-such-command"] == 2 and codes["finetune --no-such-flag"] == 2
    assert codes["bench --threads many"] == 2
    for args, _, heavy in seen:
        assert heavy == [], f"wasi-tool {' '.join(args)} imported {heavy}"


def test_python_m_wasi_tool_help_loads_no_torch_by_importtime() -> None:
    """As a user runs it: ``python -X importtime -m wasi_tool --help``, every module it loaded."""
    for args in (["--help"], ["finetune", "--help"]):
        proc = _python("-X", "importtime", "-m", "wasi_tool", *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Usage" in proc.stdout
        loaded = {ln.split("|")[-1].strip() for ln in proc.stderr.splitlines() if "|" in ln}
        assert "typer" in loaded  # the log is the import log
        assert not {m for m in loaded if m.split(".")[0] in HEAVY}, args


def test_help_is_plain_text_with_no_markup_escapes() -> None:
    """Help is click's plain layout (rich's option table cost 0.25 s of finetune --help);
    typer's rich escapes ("\\[required]") are taken back."""
    proc = _python("-m", "wasi_tool", "finetune", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[required]" in proc.stdout and "[default: digits]" in " ".join(proc.stdout.split())
    assert "\\[" not in proc.stdout and "╭" not in proc.stdout


def test_the_cli_defaults_match_the_config_dataclasses() -> None:
    """wasi_tool/cli/defaults.py is the dataclasses' defaults, read without torch; after a
    default changes: python -m wasi_tool.cli.defaults."""
    found, methods, eps, samples = defaults.current()
    assert found == defaults.DEFAULTS, "stale: run python -m wasi_tool.cli.defaults"
    assert (methods, eps) == (defaults.METHOD_NAMES, defaults.DEFAULT_EPS)
    assert samples == defaults.DEFAULT_CALIBRATION_SAMPLES
    assert defaults.FinetuneConfig.batch_size == found["FinetuneConfig"]["batch_size"]
    exclude = defaults.CompressConfig.exclude
    exclude.append("x")  # a fresh copy each time, as a default_factory gives
    assert defaults.CompressConfig.exclude == []
    with pytest.raises(AttributeError, match="no field 'nope'"):
        defaults.FinetuneConfig.nope  # noqa: B018


def test_wait_policy_choice_env_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert wait_policy() == "unset"
    assert wait_policy_env() == {"OMP_WAIT_POLICY": AUTO_WAIT_POLICY}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's own wins over auto
    assert wait_policy_env("auto") == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert wait_policy_env("passive") == {"OMP_WAIT_POLICY": "PASSIVE"}  # an explicit choice
    assert set_wait_policy("passive") == "PASSIVE" and wait_policy() == "PASSIVE"
    with pytest.raises(WasiToolError, match="wait policy must be one of auto, passive, active"):
        wait_policy_env("spin")


def test_the_cli_option_sets_the_policy_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # restored after the test
    result = CliRunner().invoke(app, ["--wait-policy", "active", "info", "no-such-dir"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert result.exit_code == 1  # info's own error: the option was taken
    result = CliRunner().invoke(app, ["--wait-policy", "spin", "info", "no-such-dir"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: wait policy must be one of auto, passive, active, got 'spin'"
    )


def test_main_sets_the_policy_before_torch_loads() -> None:
    """The entry point, in a fresh interpreter without OMP_WAIT_POLICY: torch is not yet
    imported when the policy is in the environment (OpenMP reads it once, at load)."""
    code = (
        "import os, sys\n"
        "os.environ.pop('OMP_WAIT_POLICY', None)\n"
        "sys.argv = ['wasi-tool', '--help']\n"
        "from wasi_tool.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules, file=sys.__stderr__)\n"
    )
    proc = _python("-c", code)
    assert proc.stderr.strip().splitlines()[-1] == f"{AUTO_WAIT_POLICY} False", proc.stderr


@pytest.mark.slow
def test_the_policy_reaches_a_training_bench_worker_and_its_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from wasi_tool.bench import TrainBenchConfig, run_train_bench

    cfg = TrainBenchConfig(
        random_init=True, arch="vit_tiny_patch16_224", img_size=32, num_classes=2,
        method="vanilla", batch_size=2, steps=1, warmup=0, threads=1,
    )  # fmt: skip
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for user, recorded in ((None, AUTO_WAIT_POLICY), ("ACTIVE", "ACTIVE")):
        if user is None:
            monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        else:
            monkeypatch.setenv("OMP_WAIT_POLICY", user)
        result = run_train_bench(cfg).to_dict()
        assert result["methods"]["vanilla"]["wait_policy"] == recorded
