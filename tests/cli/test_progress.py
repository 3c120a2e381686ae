"""Progress when the output is not a terminal: plain lines, in order, as the work happens;
the step figures are the epoch's running means, labelled."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from wasi_tool.cli.app import app
from wasi_tool.cli.progress import RichProgress
from wasi_tool.training.results import EpochRecord

RECIPE = """
[pipeline]
name = "progress"
description = "a compress and a two-epoch fine-tune"

[[stages]]
name = "compress"
kind = "compress"
source = { random_init = true, arch = "vit_tiny_patch16_224", img_size = 32 }
rank_ratio = 0.5

[[stages]]
name = "tune"
kind = "finetune"
input = "compress"
data = "digits"
method = "wasi"
act_ranks = [4, 3, 8]
epochs = 2
batch_size = 16
max_steps = 4
classes = [0, 1, 2]
"""


def _in_order(text: str, parts: list[str]) -> None:
    at = 0
    for part in parts:
        found = text.find(part, at)
        assert found >= 0, f"{part!r} missing or out of order in:\n{text}"
        at = found + len(part)


def test_plain_lines_show_running_means(capsys: pytest.CaptureFixture[str]) -> None:
    with RichProgress(live=False) as p:
        p.start_epoch(0, 1, 20)
        for i in range(20):
            p.step(loss=float(i), accuracy=1.0 if i % 2 else 0.0, images_per_second=100.0)
        p.end_epoch(EpochRecord(1, 9.5, 0.5, 1.0, 0.5, 0.1, 2.0))
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch 1/1 step")]
    assert len(lines) == 10  # one per tenth of the epoch
    assert lines[0].startswith("epoch 1/1 step 2/20: mean so far loss 0.5000 acc 0.500")
    assert lines[-1].startswith("epoch 1/1 step 20/20: mean so far loss 9.5000 acc 0.500")
    assert "━" not in out  # no rich bar in a log


@pytest.mark.slow
def test_run_prints_progress_lines_in_order_without_a_tty(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    _in_order(
        result.stdout,
        [
            "compress (compress): running...",
            "compress (compress): ran in",
            "tune (finetune): running...",
            "epoch 1/2 step 1/4: mean so far loss",
            "epoch 1/2 step 4/4: mean so far loss",
            "epoch 1: train loss",
            "epoch 2/2 step 1/4",
            "epoch 2/2 step 4/4",
            "epoch 2: train loss",
            "tune (finetune): ran in",
        ],
    )
    assert "━" not in result.stdout.split("tune (finetune): ran in")[0]  # no bar (tables follow)


@pytest.mark.slow
def test_bench_train_says_what_it_does_without_a_tty() -> None:
    result = CliRunner().invoke(
        app,
        [
            "bench", "--random-init", "--arch", "vit_tiny_patch16_224", "--img-size", "32",
            "--num-classes", "3", "--method", "wasi", "--vs", "vanilla", "--steps", "2",
            "--warmup", "1", "--batch-size", "8",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    _in_order(
        result.stdout,
        [
            "timing training steps (a fresh process per method)...",
            "training bench 1/2: wasi, 1 warm-up + 2 timed steps in a fresh process...",
            "training bench 1/2: wasi: median step",
            "training bench 2/2: vanilla, 1 warm-up + 2 timed steps",
            "training bench 2/2: vanilla: median step",
            "timing training steps (a fresh process per method): done in",
            "act ranks (first target)",  # the table says what it ran with
            "median step (p10-p90)",
            "2x1x32 (B/4, N/4, 32)",
            "activation ranks by the bench's default rule",
        ],
    )
