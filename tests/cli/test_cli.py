"""CLI tests: the Typer layer forwards flags, renders, and turns errors into one line + exit 1."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from wasi_tool import artifact
from wasi_tool.cli.app import app

runner = CliRunner()
# conftest's tiny model (tiny_spec); a constant because BAD_INPUTS is built at import.
TINY_FLAGS = ["--arch", "vit_tiny_patch16_224", "--img-size", "32"]


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def test_help_and_version() -> None:
    result = invoke("--help")
    assert result.exit_code == 0 and "compress" in result.stdout
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("wasi-tool ")


def test_compress_success_prints_table_and_writes_artifact(tmp_path: Path, tiny_pth: Path) -> None:
    out = tmp_path / "run"
    result = invoke("compress", tiny_pth, *TINY_FLAGS, "--eps", "0.5", "--out", out, "--plot")
    assert result.exit_code == 0, result.stderr
    assert "blocks.11.mlp.fc2" in result.stdout and "targets total" in result.stdout
    assert "compression: targets" in result.stdout
    assert artifact.is_artifact_dir(out) and (out / "energy.png").stat().st_size > 1000


def test_flags_reach_the_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run(source: Any, config: Any, out: Path, **kw: Any) -> None:
        seen.update(source=source, config=config, out=out, **kw)
        raise SystemExit(0)

    monkeypatch.setattr("wasi_tool.stages.compress.run_compress", fake_run)  # imported at run
    invoke(
        "compress", "ck.pth", "--arch", "deit_tiny_patch16_224", "--num-classes", "7",
        "--targets", "attn", "--exclude", "blocks.0.*", "--exclude", "blocks.1.*",
        "--rank-ratio", "0.3", "--force", "--out", tmp_path / "o", "--overwrite", "--plot",
        "--trust-pickle",
    )  # fmt: skip
    src, cfg = seen["source"], seen["config"]
    assert (src.checkpoint, src.arch, src.num_classes, src.trust_pickle) == (
        Path("ck.pth"), "deit_tiny_patch16_224", 7, True,
    )  # fmt: skip
    assert (cfg.targets, cfg.exclude, cfg.eps, cfg.rank_ratio, cfg.force) == (
        "attn", ["blocks.0.*", "blocks.1.*"], None, 0.3, True,
    )  # fmt: skip
    assert seen["out"] == tmp_path / "o" and seen["overwrite"] and seen["plot"]


def _corrupt_safetensors(tmp: Path, tiny: nn.Module) -> Path:
    good = tmp / "good.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(good))
    bad = tmp / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:1000])
    return bad


BAD_INPUTS = {
    "missing file": (lambda tmp, pth, tiny: ["compress", tmp / "absent.pth", *TINY_FLAGS],
                     "no such file"),
    "corrupt safetensors": (lambda tmp, pth, tiny: ["compress", _corrupt_safetensors(tmp, tiny),
                                                    *TINY_FLAGS], "cannot read safetensors"),
    "eps zero": (lambda tmp, pth, tiny: ["compress", pth, *TINY_FLAGS, "--eps", "0"],
                 "eps must be in (0, 1]"),
    "eps above one": (lambda tmp, pth, tiny: ["compress", pth, *TINY_FLAGS, "--eps", "1.5"],
                      "eps must be in (0, 1]"),
    "eps nan": (lambda tmp, pth, tiny: ["compress", pth, *TINY_FLAGS, "--eps", "nan"],
                "eps must be in (0, 1]"),
    "unknown arch": (lambda tmp, pth, tiny: ["compress", pth, "--arch", "vit_tinyy_patch16_224"],
                     "unknown architecture"),
    "weights of another arch": (lambda tmp, pth, tiny: ["compress", pth, "--arch",
                                                        "deit_small_patch16_224", "--img-size",
                                                        "32"], "weights do not fit"),
    "wrong class count": (lambda tmp, pth, tiny: ["compress", pth, *TINY_FLAGS,
                                                  "--num-classes", "5"], "shape mismatch (head"),
    "no target matches": (lambda tmp, pth, tiny: ["compress", pth, *TINY_FLAGS, "--targets",
                                                  "decoder.*"], "no linear layer matches"),
    "eps and rank ratio": (lambda tmp, pth, tiny: ["compress", pth, *TINY_FLAGS, "--eps", "0.5",
                                                   "--rank-ratio", "0.5"], "not both"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_1_with_one_line_and_no_output_dir(
    case: str, tmp_path: Path, tiny_pth: Path, tiny: nn.Module
) -> None:
    make_args, expected = BAD_INPUTS[case]
    out = tmp_path / "runs" / "out"
    result = invoke(*make_args(tmp_path, tiny_pth, tiny), "--out", out)
    assert result.exit_code == 1, result.output
    # without a terminal a long command says what it starts ("compressing..."), nothing else
    assert all(line.endswith("...") for line in result.stdout.splitlines()), result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_existing_output_is_refused_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("compress", "--random-init", *TINY_FLAGS, "--out", out)
    assert result.exit_code == 1 and "--overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_compress_accepts_an_artifact(tmp_path: Path) -> None:
    first = tmp_path / "a"
    assert (
        invoke(
            "compress", "--random-init", *TINY_FLAGS, "--rank-ratio", "0.5", "--out", first
        ).exit_code
        == 0
    )
    result = invoke(
        "compress", first, "--targets", "all", "--rank-ratio", "0.25", "--out", tmp_path / "b"
    )
    assert result.exit_code == 0, result.stderr
    assert "48/48 factored" in result.stdout
    stages = artifact.read_manifest(tmp_path / "b")["stages"]
    assert [s["config"]["targets"] for s in stages] == ["mlp", "all"]


def test_finetune_flags_reach_the_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run(source: Any, data: Any, config: Any, out: Path, **kw: Any) -> None:
        seen.update(source=source, data=data, config=config, out=out, **kw)
        raise SystemExit(0)

    monkeypatch.setattr("wasi_tool.stages.finetune.run_finetune", fake_run)  # imported at run
    invoke(
        "finetune", "runs/x", "--data", "cifar.npz", "--method", "asi", "--act-ranks", "8,4,16",
        "--epochs", "2", "--batch-size", "16", "--lr", "0.1", "--lr-min", "0.01", "--clip", "0",
        "--classes", "5,6", "--act-order", "parallel", "--out", tmp_path / "o", "--resume",
    )  # fmt: skip
    cfg = seen["config"]
    assert (seen["source"].checkpoint, seen["data"], seen["out"], seen["resume"]) == (
        Path("runs/x"), "cifar.npz", tmp_path / "o", True,
    )  # fmt: skip
    assert (cfg.method, cfg.act_ranks, cfg.epochs, cfg.batch_size, cfg.lr, cfg.lr_min) == (
        "asi", [8, 4, 16], 2, 16, 0.1, 0.01,
    )  # fmt: skip
    assert (cfg.clip, cfg.classes, cfg.act_order, cfg.momentum, cfg.weight_decay) == (
        None, [5, 6], "parallel", 0.0, 1e-4,
    )  # fmt: skip


def test_bsr_and_lora_flags_reach_the_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []

    def fake_run(source: Any, data: Any, config: Any, out: Path, **kw: Any) -> None:
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr("wasi_tool.stages.finetune.run_finetune", fake_run)  # imported at run
    invoke(
        "finetune", "ckpt", "--method", "bsr+wasi", "--bsr-blocks", "3,7,11", "--drop-at", "3,6,9",
        "--keep-rate", "0.7", "--no-fuse", "--out", tmp_path / "o",
    )  # fmt: skip
    invoke(
        "finetune", "ckpt", "--method", "lora", "--lora-rank", "4", "--lora-alpha", "8",
        "--lora-dropout", "0.1", "--out", tmp_path / "o",
    )  # fmt: skip
    invoke("finetune", "ckpt", "--method", "lora-fa", "--match-memory", "runs/w", "--out", tmp_path)
    bsr_cfg, lora_cfg, match_cfg = seen
    assert (match_cfg.method, match_cfg.match_memory) == ("lora-fa", "runs/w")
    assert (bsr_cfg.method, bsr_cfg.options.blocks, bsr_cfg.options.drop_at) == (
        "bsr+wasi",
        [3, 7, 11],
        [3, 6, 9],
    )
    assert (bsr_cfg.options.keep_rate, bsr_cfg.options.fuse) == (0.7, False)
    lora = lora_cfg.options
    assert (lora_cfg.method, lora.rank, lora.alpha, lora.dropout) == (
        "lora", 4, 8.0, 0.1,
    )  # fmt: skip


@pytest.mark.slow
def test_finetune_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "ft"
    result = invoke(
        "finetune", "--random-init", *TINY_FLAGS, "--method", "wasi", "--act-ranks", "8,3,16",
        "--epochs", "1", "--batch-size", "32", "--max-steps", "2", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "saved for backward / step (targets)" in result.stdout
    assert (out / "metrics.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--act-ranks", "8,x"], "comma-separated integers"),
        (["--method", "dora"], "unknown method"),
        (["--method", "bsr", "--keep-rate", "0"], "keep_rate must be in (0, 1]"),
        (["--method", "bsr", "--bsr-blocks", "3,99"], "bsr blocks [99] out of range"),
        (["--method", "bsr", "--drop-at", "a"], "comma-separated integers"),
        (["--method", "lora", "--lora-rank", "0"], "lora_rank must be >= 1"),
        (["--data", "/no/such/data"], "no such dataset"),
        (["--act-eps", "1.5"], "act_eps must be in (0, 1]"),
        (["--momentum", "0.9"], "momentum"),
        (["--method", "vanilla", "--match-memory", "runs/w"], "vanilla has no setting"),
        (["--method", "lora", "--match-memory", "/no/such/run"], "not a finished finetune run"),
    ],
)
def test_finetune_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "runs" / "ft"
    result = invoke("finetune", "--random-init", *TINY_FLAGS, *args, "--out", out)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_export_of_a_corrupt_artifact_is_one_line(tmp_path: Path) -> None:
    art = tmp_path / "a"
    assert (
        invoke(
            "compress", "--random-init", *TINY_FLAGS, "--rank-ratio", "0.5", "--out", art
        ).exit_code
        == 0
    )
    blob = bytearray((art / "model.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (art / "model.safetensors").write_bytes(bytes(blob))
    result = invoke("export", art, "--onnx", "--out", tmp_path / "e")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "does not match its sha256" in lines[0]
    assert not (tmp_path / "e").exists()


def test_export_flags_reach_the_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run(source: Any, config: Any, out: Path, **kw: Any) -> None:
        seen.update(source=source, config=config, out=out, **kw)
        raise SystemExit(0)

    monkeypatch.setattr("wasi_tool.stages.export.run_export", fake_run)  # imported at run
    invoke("export", "runs/x", "--safetensors", "--merge", "--out", tmp_path / "o")
    assert (seen["config"].onnx, seen["config"].merge) == (False, True)
    invoke(
        "export", "runs/x", "--int8", "--ort-opt", "all", "--atol", "1e-3", "--out", tmp_path / "o"
    )
    cfg = seen["config"]
    assert (cfg.onnx, cfg.int8, cfg.ort_opt, cfg.atol) == (True, True, "all", 1e-3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["absent.onnx"], "no such ONNX file"),
        (["{junk}"], "not a readable ONNX model"),
        (["{junk}", "--device", "pi9"], "unknown device profile"),
        (["{junk}", "--ssh", "bad host@x"], "--ssh takes user@host[:port]"),
        ([], "give an ONNX model, or CHECKPOINT --train"),
        (["--train", "absent.pth", "--arch", "vit_tiny_patch16_224"], "no such file"),
        (["--train", "x.pth", "--method", "sgd"], "unknown method"),
        (["--train", "--arch", "vit_tiny_patch16_224"], "--random-init"),
    ],
)
def test_bench_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 100)
    args = [a.replace("{junk}", str(junk)) for a in args]
    result = invoke("bench", *args, "--json", tmp_path / "out.json")
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert lines[0].count("error:") == 1, lines  # a worker's own "error: " is not repeated
    assert not (tmp_path / "out.json").exists()


def test_bench_train_is_a_flag_and_does_not_swallow_the_next_one(tmp_path: Path) -> None:
    # `--train` used to take a value, so `--train --random-init` read "--random-init" as a path.
    result = invoke("bench", "--train", "--random-init", *TINY_FLAGS, "--method", "sgd")
    assert result.exit_code == 1
    assert "unknown method" in result.stderr and "--random-init" not in result.stderr
    # the checkpoint is the positional argument, before or after the flag
    for args in (["--train", "x.pth"], ["x.pth", "--train"]):
        result = invoke("bench", *args, "--method", "sgd")
        assert result.exit_code == 1 and "unknown method" in result.stderr, result.stderr


@pytest.mark.slow
def test_bench_train_is_a_flag_and_a_worker_error_is_said_once(tmp_path: Path) -> None:
    """`--train` takes no value (it used to swallow the next flag as its checkpoint), and a
    worker's own one-line error is not prefixed with "error:" a second time."""
    tiny = ["--arch", "vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "2"]
    out = tmp_path / "t.json"
    result = invoke(
        "bench", "--train", "--random-init", *tiny, "--steps", "1", "--warmup", "0", "--json", out
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(out.read_text())["methods"]["wasi"]["steps"] == 1
    result = invoke("bench", "--train", "--random-init", *tiny, "--memory-budget", "1MB")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].count("error:") == 1, lines
    assert "memory budget" in lines[0]


def test_bench_runs_locally_and_writes_json(tmp_path: Path, tiny_onnx: Callable[..., Path]) -> None:
    a, b = tiny_onnx(tmp_path / "a.onnx"), tiny_onnx(tmp_path / "b.onnx", seed=1)
    out = tmp_path / "bench.json"
    result = invoke("bench", a, "--vs", b, "--device", "pi5", "--repeats", "3", "--json", out)
    assert result.exit_code == 0, result.stderr
    assert "not a pi5" in result.stdout and "p99 ms" in result.stdout
    import json

    assert json.loads(out.read_text())["profile"]["name"] == "pi5"


class _Stop(Exception):
    pass


def test_bench_seq_len_reaches_the_training_bench_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """--seq-len spelled out with --train sets the training bench's tokens per input (it was
    the inference bench's only, and a training bench of 8 x 128 silently ran 8 x 16)."""
    import wasi_tool.bench.train as train_bench

    seen: list[Any] = []

    def capture(config: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(config)
        raise _Stop

    monkeypatch.setattr(train_bench, "run_train_bench", capture)
    for extra, expected in ((["--seq-len", "24"], 24), ([], None)):
        with pytest.raises(_Stop):
            runner.invoke(
                app,
                ["bench", "--train", "--random-init", *TINY_FLAGS, *extra],
                catch_exceptions=False,
            )
        assert seen[-1].seq_len == expected
