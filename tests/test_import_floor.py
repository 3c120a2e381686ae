"""The import floor: a training process imports only what training needs.

Each check runs in a fresh interpreter (this test process has onnx and more loaded already) and
reads its ``sys.modules``: no onnx, onnxruntime, onnxscript, matplotlib, peft or transformers
unless the run uses them, and no scikit-learn for the built-in digits data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.child import run_child

# What a training run of a timm model on the digits data must not import.
NOT_FOR_TRAINING = (
    "onnx",
    "onnxruntime",
    "onnxscript",
    "matplotlib",
    "peft",
    "transformers",
    "flwr",
)
WATCHED = (*NOT_FOR_TRAINING, "sklearn", "scipy", "wasi_tool.pipeline", "wasi_tool.bench.inference")


def _probe(code: str, cwd: Path) -> Any:
    """Run ``code`` in a fresh interpreter and return the JSON of what it prints last.
    ``code`` may call ``loaded()``: the WATCHED modules imported so far."""
    script = (
        f"import json, sys\n"
        f"def loaded():\n    return sorted(m for m in {WATCHED!r} if m in sys.modules)\n"
        f"{code}\n"
    )
    return run_child(script, cwd)


def test_the_probe_sees_a_heavy_import(tmp_path: Path) -> None:
    """The check can fail: a module imported in the child is reported."""
    assert _probe("import onnx\nprint(json.dumps(loaded()))", tmp_path) == ["onnx"]


def test_startup_imports_nothing_heavy(tmp_path: Path) -> None:
    """The training bench's worker (whose peak RSS the bench reports), then the CLI's startup."""
    worker, app = _probe(
        "import wasi_tool.bench.train_worker\nworker = loaded()\n"
        "import wasi_tool.cli.app\nprint(json.dumps([worker, loaded()]))",
        tmp_path,
    )
    assert worker == [], worker  # nothing watched: not even the inference bench
    assert not set(app) & set(NOT_FOR_TRAINING), app
    assert "wasi_tool.pipeline" not in app  # `run`'s stage machinery loads when `run` runs


@pytest.mark.slow
def test_a_wasi_finetune_through_the_cli_imports_only_what_training_needs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = f"""
from typer.testing import CliRunner
from wasi_tool.cli.app import app
r = CliRunner().invoke(app, ["finetune", "--random-init", "--arch", "vit_tiny_patch16_224",
    "--img-size", "32", "--data", "digits", "--method", "wasi", "--epochs", "1",
    "--max-steps", "2", "--batch-size", "16", "--classes", "0,1", "--out", {str(out)!r}])
print(json.dumps([r.exit_code, r.output[-2000:], loaded()]))
"""
    exit_code, output, loaded = _probe(code, tmp_path)
    assert exit_code == 0, output
    assert (out / "metrics.json").is_file()  # it trained and wrote its artifact
    assert not set(loaded) & set(NOT_FOR_TRAINING), loaded
    # The digits are read from the file scikit-learn ships; its import costs ~70 MB of RSS.
    assert "sklearn" not in loaded and "scipy" not in loaded, loaded


def test_digits_without_sklearn_match_load_digits() -> None:
    from sklearn.datasets import load_digits

    from wasi_tool.data.datasets import _digits_arrays

    images, target = _digits_arrays()
    ref = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == ref.images.dtype
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(target, ref.target)
