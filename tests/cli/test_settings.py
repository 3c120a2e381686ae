"""Commands take their config's settings as options (types, defaults, help from the config
dataclasses and their docstrings, through the generated cli/defaults.py)."""

from __future__ import annotations

from typing import Any

import click
import pytest
import typer

from wasi_tool.cli import defaults
from wasi_tool.cli.app import app
from wasi_tool.cli.settings import settings_of


def _options(command: str) -> dict[str, click.Option]:
    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    params = group.commands[command].params
    return {p.name: p for p in params if isinstance(p, click.Option) and p.name}


def test_the_generated_settings_are_current() -> None:
    """Stale when a training config's field, type or docstring entry changes: run
    python -m wasi_tool.cli.defaults."""
    assert defaults.current_settings() == defaults.SETTINGS


@pytest.mark.parametrize(
    ("command", "config", "elsewhere"),
    [
        ("finetune", "FinetuneConfig", {}),
        # federate: --local-epochs sets epochs; a budget is refused by a federated run
        ("federate", "FederateConfig", {"epochs": "local_epochs", "memory_budget": None}),
        # bench: MODEL is the checkpoint; batch, warm-up and threads are shared with the
        # inference bench (their defaults say both); --seq-len is the inference bench's
        (
            "bench",
            "TrainBenchConfig",
            {k: None for k in ("checkpoint", "settings_from", "seq_len", "batch_size", "warmup")},
        ),
    ],
)
def test_every_setting_of_the_config_is_an_option(
    command: str, config: str, elsewhere: dict[str, Any]
) -> None:
    options = _options(command)
    for setting in settings_of(config):
        if setting.key in elsewhere:
            continue
        assert setting.key in options, (command, setting.key)
        option = options[setting.key]
        assert setting.flag in option.opts
        if setting.kind != "list[int]" and setting.key != "clip":
            assert option.default == setting.default, setting.key
        assert option.help
    assert {"lora_rank", "keep_rate", "mezo_mu", "act_eps", "memory_mode"} <= set(options)


def test_federate_sets_activation_ranks_memory_and_method_options(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from typer.testing import CliRunner

    seen: list[Any] = []

    def fake_run(checkpoint: Any, data: Any, config: Any, out: Any, **kw: Any) -> None:
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr("wasi_tool.federated.run_federate", fake_run)
    args = [
        "federate", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"), "--method", "lora",
        "--lora-rank", "4", "--act-ranks", "4,4,8", "--memory-mode", "mlp", "--classes", "1,2",
        "--local-epochs", "2", "--clients", "3",
    ]  # fmt: skip
    CliRunner().invoke(app, args)
    (config,) = seen
    assert (config.method, config.options.rank, config.act_ranks) == ("lora", 4, [4, 4, 8])
    assert (config.memory_mode, config.classes, config.epochs, config.clients) == (
        "mlp", [1, 2], 2, 3,
    )  # fmt: skip
    args = ["federate", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"), "--method", "bsr"]
    CliRunner().invoke(app, [*args, "--bsr-blocks", "1,3", "--keep-rate", "0.7", "--no-fuse"])
    assert (seen[-1].options.blocks, seen[-1].options.keep_rate, seen[-1].options.fuse) == (
        [1, 3], 0.7, False,
    )  # fmt: skip


def test_a_setting_of_another_method_is_refused_on_the_command_line(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(
        app, ["finetune", "ckpt", "--method", "wasi", "--lora-rank", "4", "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "lora_rank is a setting of lora, lora-fa, not of method wasi" in result.stderr
