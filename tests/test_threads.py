"""--threads: torch's threads here and in the processes started from here; onnxruntime's in
the inference bench; bad values are one-line errors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from wasi_tool.cli.app import app
from wasi_tool.errors import WasiToolError
from wasi_tool.threads import use_threads


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


def test_use_threads_sets_torch_and_children(restore_threads: None) -> None:
    assert use_threads(None) == torch.get_num_threads()
    assert use_threads(1) == 1 and torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"
    for bad in (0, -2, 5000):
        with pytest.raises(WasiToolError, match="threads must be between 1 and 1024"):
            use_threads(bad)


def test_cli_rejects_zero_threads_in_one_line(restore_threads: None) -> None:
    for cmd in (["finetune", "--random-init", "--out", "x"], ["bench", "m.onnx"]):
        result = CliRunner().invoke(app, [*cmd, "--threads", "0"])
        assert result.exit_code == 1, result.output
        assert result.stderr.strip() == "error: threads must be between 1 and 1024, got 0"
    assert not Path("x").exists()


def test_inference_bench_threads_override_the_profile(
    tmp_path: Path, tiny_onnx: Callable[..., Path], restore_threads: None
) -> None:
    model, out = tiny_onnx(tmp_path / "a.onnx"), tmp_path / "r.json"
    args = ["bench", str(model), "--device", "pi5", "--threads", "1", "--repeats", "3"]
    result = CliRunner().invoke(app, [*args, "--warmup", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["threads"] == 1 and "warnings" not in data  # 1 thread fits any host
