"""The examples run (CI runs them on their --tiny settings, as subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "examples")])}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_own_loop_example_then_cli_export(tmp_path: Path) -> None:
    out = _run([str(ROOT / "examples/own_loop.py"), "--tiny", "--out", "art"], tmp_path)
    assert "epoch 2" in out and "given up" in out
    cli = [
        "-m", "wasi_tool", "export", "art", "--model-class", "vit_model:ViT", "--out", "onnx",
    ]  # fmt: skip
    _run(cli, tmp_path)
    assert (tmp_path / "onnx" / "model.onnx").is_file()


@pytest.mark.slow
def test_hf_trainer_example(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = _run([str(ROOT / "examples/hf_trainer.py"), "--tiny", "--out", "hf"], tmp_path)
    assert "trained 8 steps" in out
