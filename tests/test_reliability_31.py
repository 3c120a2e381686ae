# ruff: noqa: E501  (the commands table below reads best one command a line)
"""Issue 31: outputs that never overwrite what a command reads (one output-path rule), bounds
on generated, tokenized and manifest-bound work, federated inputs through typed validation,
temporary directories always removed. (The one-line CLI cases are in the corpus of
tests/test_reliability.py; these check what a corpus case cannot: bytes, devices, budgets.)"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from torch import nn
from typer.testing import CliRunner

from tests.models.llm_fixtures import save_llama_lm
from wasi_tool import artifact
from wasi_tool.cli.app import app
from wasi_tool.errors import WasiToolError
from wasi_tool.models import ModelSource
from wasi_tool.stages import CompressConfig, run_compress

TINY_ARCH = "vit_tiny_patch16_224"
SRC = ModelSource(random_init=True, arch=TINY_ARCH, img_size=32)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_compress(SRC, CompressConfig(rank_ratio=0.5), tmp_path_factory.mktemp("a") / "c").out


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama_lm(tmp_path_factory.mktemp("lm") / "lm")


def _digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (and the kind of every other entry)."""
    found = {}
    for p in sorted(root.rglob("*")):
        mode = os.lstat(p).st_mode
        found[str(p)] = (
            hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(mode) else oct(mode)
        )
    return found


def _one_line(result: Any, expected: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output


# -- 1. the output-path rule: each refusal leaves the inputs byte-identical --------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["info", "{art}", "--json", "{art}/manifest.json"], "inside the input artifact"),
        (
            ["eval", "{art}", "--data", "digits", "--predictions", "{art}/model.safetensors"],
            "inside the input artifact",
        ),
        (["compress", "{art}", "--out", "{art}", "--overwrite"], "is an input of this command"),
        (["compress", "{art}/model.safetensors", "--out", "{art}/..", "--overwrite"], "holds"),
    ],
)
def test_an_output_onto_an_input_is_refused_and_the_input_is_byte_identical(
    art: Path, argv: list[str], expected: str
) -> None:
    before = _digest(art.parent)
    result = CliRunner().invoke(app, [a.replace("{art}", str(art)) for a in argv])
    _one_line(result, expected)
    assert _digest(art.parent) == before


def test_a_hard_link_to_an_input_file_is_replaced_never_written_through(
    art: Path, tmp_path: Path
) -> None:
    """The atomic write renames a new file onto the output's name: a hard link to a file of
    an input artifact loses its name, the input's bytes stay (a direct input is refused)."""
    link = tmp_path / "report.json"
    os.link(art / "manifest.json", link)
    before = _digest(art)
    result = CliRunner().invoke(app, ["info", str(art), "--json", str(link)])
    assert result.exit_code == 0, result.output
    assert _digest(art) == before
    assert json.loads(link.read_text())["path"] == str(art)


def _device(tmp_path: Path) -> Path:
    """A character device with the null device's numbers, made in ``tmp_path`` (a test never
    points at /dev itself: if the rule broke, only this node would be replaced)."""
    node = tmp_path / "null"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod needs root")
    return node


def test_a_device_node_is_refused_and_stays_a_device(art: Path, tmp_path: Path) -> None:
    node = _device(tmp_path)
    rdev = os.lstat(node).st_rdev
    before = _digest(art)
    for argv in (
        ["eval", str(art), "--data", "digits", "--predictions", str(node)],
        ["info", str(art), "--json", str(node)],
    ):
        _one_line(CliRunner().invoke(app, argv), "is a character device, not a regular file")
        st = os.lstat(node)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == rdev
    assert _digest(art) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]  # no temporary left


def test_a_fifo_and_a_socket_are_refused(art: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # a reader is open, so a writer that wrongly opened the FIFO would not block the test
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        before = _digest(art)
        for target, kind in ((fifo, "a FIFO"), (sock_path, "a socket")):
            _one_line(
                CliRunner().invoke(app, ["info", str(art), "--json", str(target)]),
                f"is {kind}, not a regular file",
            )
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        assert os.read(reader, 1) == b""  # no writer, nothing written into the FIFO
        assert _digest(art) == before
    finally:
        os.close(reader)
        sock.close()


def test_the_atomic_file_writer_replaces_a_regular_file_and_leaves_nothing_on_failure(
    tmp_path: Path,
) -> None:
    target = tmp_path / "out" / "deep" / "r.json"
    artifact.write_file(target, "one")
    artifact.write_file(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["r.json"]
    fresh = tmp_path / "new" / "sub" / "x.csv"
    with pytest.raises(RuntimeError), artifact.atomic_file(fresh) as fh:
        fh.write("half")
        raise RuntimeError("the writer failed")
    assert not (tmp_path / "new").exists()  # not the temporary, not the parents it made
    with pytest.raises(WasiToolError, match="is a symbolic link"):
        (tmp_path / "link").symlink_to(target)
        artifact.write_file(tmp_path / "link", "x")
    assert target.read_bytes() == b"two"


def test_the_rule_holds_in_the_library_too(art: Path, tmp_path: Path) -> None:
    """Outside the CLI: eval's --predictions knows its own inputs; a directory output inside
    an artifact read in the same command scope is refused."""
    from wasi_tool.stages.evaluate import run_eval

    before = _digest(art)
    with pytest.raises(WasiToolError, match="inside the input artifact"):
        run_eval(ModelSource(checkpoint=art), "digits", predictions=art / "p.csv")
    with artifact.command_inputs(), pytest.raises(WasiToolError, match="inside the input"):
        artifact.read_manifest(art)
        with artifact.atomic_directory(art / "sub"):
            pass
    assert _digest(art) == before


# -- 2. bounds ---------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    """The real CLI in a subprocess: the timeout is the failure, not a timing assertion."""
    return subprocess.run(
        [sys.executable, "-m", "wasi_tool", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})},
    )


@pytest.mark.slow
def test_generate_ends_with_one_line_on_a_looping_template_and_a_billion_tokens(
    lm_dir: Path, tmp_path: Path
) -> None:
    loop = tmp_path / "loop"
    loop.mkdir()
    for p in lm_dir.iterdir():
        (loop / p.name).write_bytes(p.read_bytes())
    (loop / "chat_template.jinja").write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
    )
    for args, expected in (
        ([str(loop), "--prompt", "hi"], "chat template ran more than"),
        ([str(lm_dir), "--prompt", "hi", "--max-new-tokens", "1000000000"], "context of 256"),
    ):
        # a hang fails as TimeoutExpired; 60 s is the acceptance figure on a quiet machine
        # (about 10 s there), the margin is for a loaded one (start-up is most of it)
        done = _cli("generate", *args, timeout=150)
        assert done.returncode == 1, done.stderr
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and expected in lines[0], done.stderr


def test_generation_settings_are_checked_against_the_context(lm_dir: Path) -> None:
    from wasi_tool.models import hf
    from wasi_tool.models.loading import load_model

    model = load_model(ModelSource(checkpoint=lm_dir)).model
    assert hf.context_length(model) == (256, "max_position_embeddings")
    for kwargs, message in (
        ({"temperature": float("nan")}, "temperature must be a finite"),
        ({"temperature": float("inf")}, "temperature must be a finite"),
        ({"top_p": float("nan")}, "top_p must be in"),
        ({"max_new_tokens": 250}, "at most 246"),
        ({"prompt": 300}, "the prompt is more than 256 tokens"),
    ):
        prompt = [5] * kwargs.pop("prompt", 10)
        with pytest.raises(WasiToolError, match=message):
            hf.generate(model, prompt, kwargs.pop("max_new_tokens", 4), **kwargs)
    assert len(hf.generate(model, [5] * 250, 6)) <= 6  # exactly at the context: runs


class _Recording:
    """A tokenizer that records the longest text it is given."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.longest = 0
        self.chat_template = tokenizer.chat_template
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **kwargs)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.decode(*args, **kwargs)


def test_text_is_cut_before_it_reaches_the_tokenizer(
    lm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wasi_tool.data import lm
    from wasi_tool.models import hf

    tok = hf.load_tokenizer(lm_dir)
    rec = _Recording(tok)
    rows = [
        {"prompt": "cat", "response": "grinning face " * 22_000},  # 300 KB: more than 4 pieces
        {"prompt": "dog", "response": "hund"},
        {"prompt": "fish", "response": "fisch"},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    splits = lm.load_lm_data(data, rec, seq_len=32, val_fraction=0.3)
    assert rec.longest <= lm.PIECE_CHARS * 4
    answers = [*splits.train.answers, *splits.test.answers]  # type: ignore[attr-defined]
    assert "hund" in answers and max(map(len, answers)) < 1000  # the long answer is cut too
    # the cut changes nothing: the same ids as tokenizing each text whole (the old way)

    def whole(tokenizer: Any, text: str, count: int, add_special_tokens: bool = False) -> Any:
        ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        return ids[:count], len(ids) > count

    monkeypatch.setattr(lm, "token_prefix", whole)
    reference = lm.load_lm_data(data, tok, seq_len=32, val_fraction=0.3)
    for side in ("train", "test"):
        got, ref = getattr(splits, side), getattr(reference, side)
        assert torch.equal(got.ids, ref.ids) and torch.equal(got.labels, ref.labels), side
    monkeypatch.undo()
    rec.longest = 0
    text = " ".join(["grinning face with big eyes"] * 5000) + "x" * 100_000
    assert lm.stream_ids(rec, text) == list(tok(text, add_special_tokens=False)["input_ids"])
    assert rec.longest <= lm.PIECE_CHARS
    ids, more = lm.token_prefix(tok, text, 10)
    assert more and ids == list(tok(text, add_special_tokens=False)["input_ids"])[:10]


def test_a_template_that_loops_is_stopped_by_its_step_budget(lm_dir: Path) -> None:
    from wasi_tool.data import lm
    from wasi_tool.models import hf

    tok = hf.load_tokenizer(lm_dir)
    text = lm.render_prompt(tok, [{"role": "user", "content": "hi"}])
    assert text == "<|user|>hi\n<|assistant|>"
    before = sys.gettrace()
    tok.chat_template = (
        "{% for i in range(100000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}"
    )
    with pytest.raises(WasiToolError, match="ran more than 1000000 steps"):
        lm.render_prompt(tok, [{"role": "user", "content": "hi"}])
    assert sys.gettrace() is before  # the tracer is taken off again


def test_size_is_checked_before_the_hash(art: Path, tmp_path: Path, monkeypatch: Any) -> None:
    copy = tmp_path / "c"
    copy.mkdir()
    for p in art.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    os.truncate(copy / "model.safetensors", 1 << 40)  # sparse: no data on disk

    real = artifact.sha256_file

    def never(path: Path, chunk: int = 1 << 20) -> str:
        assert Path(path).name != "model.safetensors", f"hashed {path}"
        return real(path, chunk)

    monkeypatch.setattr(artifact.io, "sha256_file", never)
    manifest = artifact.read_manifest(copy)
    with pytest.raises(WasiToolError, match="is 1099511627776 bytes, its manifest records"):
        artifact.verify_files(copy, manifest, [artifact.WEIGHTS])
    assert artifact.describe(copy)["files"]["model.safetensors"]["status"] == "mismatch"


def test_manifest_bound_work_is_capped(art: Path) -> None:
    manifest = artifact.read_manifest(art)
    layer = {"name": "x", "out_features": 1, "in_features": 1, "rank": None}
    for key, value, message in (
        ("layers", [layer] * 300_000, "300000 layers records, more than the 20000 allowed"),
        ("stages", [{}] * 5000, "5000 stages records"),
        ("model", {"kwargs": ["a"]}, "model kwargs must be an object, got list"),
        ("layers", [{**layer, "act_ranks": list(range(100))}], "a layer record needs"),
    ):
        with pytest.raises(WasiToolError, match=message):
            artifact.validate_manifest({**manifest, key: value})


def test_info_at_the_layer_cap_shows_a_bounded_table(art: Path, tmp_path: Path) -> None:
    copy = tmp_path / "c"
    copy.mkdir()
    for p in art.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    manifest = json.loads((art / "manifest.json").read_text())
    layer = {"name": "blocks.0.mlp.fc1", "out_features": 8, "in_features": 8, "rank": 2}
    manifest["layers"] = [layer] * artifact.MAX_LAYERS
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(app, ["info", str(copy), "--json", str(tmp_path / "i.json")])
    assert result.exit_code == 0, result.output
    assert f"and {artifact.MAX_LAYERS - 500} more layers (all of them in --json)" in result.output
    assert len(json.loads((tmp_path / "i.json").read_text())["layers"]) == artifact.MAX_LAYERS


# -- 3. federated inputs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"rounds": "2"}', "rounds takes int, got '2'"),
        ('{"lr": 1e400}', "lr takes float, got inf"),
        ('{"eps": NaN}', "eps takes float, got nan"),
        ("[]", "the settings must be an object of fields, got list"),
        ('{"rounds": 2, "speed": 1}', "unknown setting 'speed'"),
        ('{"clients": 100000}', "clients must be <= 10000"),
        ("[" * 100 + "]" * 100, "nested more than 64 levels"),
    ],
)
def test_flower_settings_are_typed_and_bounded(tmp_path: Path, text: str, message: str) -> None:
    from wasi_tool.federated.config import FederateConfig, read_settings

    path = tmp_path / "settings.json"
    path.write_text(text)
    with pytest.raises(WasiToolError, match=message) as info:
        read_settings(path)
    assert "\n" not in str(info.value)
    path.write_text('{"rounds": 2, "lr": 0.1, "classes": [1, 2], "config_version": 1}')
    assert read_settings(path) == FederateConfig(rounds=2, lr=0.1, classes=[1, 2])


def test_a_saved_history_is_validated() -> None:
    from wasi_tool.federated.server import check_history

    row = {"round": 1, "clients": [{"node": 1, "status": "ok"}], "accepted": 1}
    row |= {"test_loss": 1.0, "test_accuracy": 0.5, "seconds": 2.0}
    assert check_history([row], "s", 3) == [row]
    for bad, message in (
        ("round 1", "history must be a list of rounds, got str"),
        ([row] * 4, "4 rounds saved, this run has 3"),
        ([{**row, "round": 2}], "history record 1 is not a round record"),
        ([{**row, "clients": "x"}], "history record 1"),
        ([{**row, "test_loss": "low"}], "history record 1"),
    ):
        with pytest.raises(WasiToolError, match=message):
            check_history(bad, "s", 3)


@pytest.fixture(scope="module")
def start(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("flwr")
    out = tmp_path_factory.mktemp("fed") / "start"
    run_compress(SRC, CompressConfig(targets="mlp", eps=0.8), out)
    return out


def _npz(path: Path, classes: int, n: int) -> Path:
    x = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3)).astype(np.uint8)
    y = np.arange(n) % classes
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
    return path


@pytest.mark.parametrize("case", ["class sets", "too few", "dirichlet"])
def test_partitions_are_checked_before_any_round_and_nothing_is_written(
    start: Path, tmp_path: Path, case: str
) -> None:
    from wasi_tool.federated import FederateConfig, run_federate
    from wasi_tool.federated.server import state_dir

    recipe = {"method": "wasi", "batch_size": 8, "max_steps": 1, "rounds": 1}
    if case == "class sets":
        (tmp_path / "data").mkdir()
        _npz(tmp_path / "data" / "a.npz", 2, 10)
        _npz(tmp_path / "data" / "b.npz", 5, 10)
        data, cfg = tmp_path / "data", FederateConfig(**recipe, clients=2, partition="folders")
        message = r"client b.npz has 5 classes \(0, 1, 2, 3, 4\), a.npz has 2 classes"
    elif case == "too few":
        data, cfg = _npz(tmp_path / "d.npz", 2, 16), FederateConfig(**recipe, clients=20)
        message = "16 training samples cannot be split among 20 clients"
    else:
        data = _npz(tmp_path / "d.npz", 2, 40)
        cfg = FederateConfig(**recipe, clients=8, partition="dirichlet:0.01")
        message = "could not give each of 8 clients"
    out = tmp_path / "runs" / "fed"
    with pytest.raises(WasiToolError, match=message):
        run_federate(start, data, cfg, out)
    assert not out.exists() and not state_dir(out).exists() and not out.parent.exists()


def test_a_failed_first_round_leaves_no_state(start: Path, tmp_path: Path) -> None:
    from wasi_tool.federated import FederateConfig, run_federate
    from wasi_tool.federated.server import state_dir

    cfg = FederateConfig(method="wasi", batch_size=8, max_steps=1, rounds=2, clients=1)
    out = tmp_path / "fed"
    with pytest.raises(WasiToolError, match="no round completed, nothing was saved"):
        run_federate(start, "digits", cfg, out, hook=lambda node, sent, reply: None)
    assert not state_dir(out).exists() and not out.exists()


def test_the_federated_extra_keeps_the_typer_pyproject_asks_for() -> None:
    """flwr caps typer (<0.21): the extra names the typer the CLI is tested with, so the
    installed typer satisfies the core requirement and, with flwr installed, the extra's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = version("typer")
    wanted = [Requirement(r) for r in project["dependencies"]]
    try:
        version("flwr")
        wanted += [Requirement(r) for r in project["optional-dependencies"]["federated"]]
    except PackageNotFoundError:
        pass
    typer_reqs = [r for r in wanted if r.name == "typer"]
    assert typer_reqs
    for req in typer_reqs:
        assert req.specifier.contains(installed, prereleases=True), (str(req), installed)
    extra = [Requirement(r) for r in project["optional-dependencies"]["federated"]]
    assert any(r.name == "typer" for r in extra)  # named beside flwr, never left to its cap


# -- 4. prepare's example input, checked before the model changes ------------------------------


def test_check_example_input_names_it_and_leaves_the_model_unchanged() -> None:
    from wasi_tool.models.inputs import check_example_input

    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    check_example_input(model, torch.randn(3, 8))
    for bad, message in (
        (torch.randn(3, 7), r"example_input of shape \(3, 7\) and dtype float32 does not run"),
        ([torch.randn(3, 8)], "example_input must be a tensor"),
        (torch.tensor(1.0), "example_input must be a batch"),
        (torch.full((2, 8), float("nan")), "example_input holds NaN"),
    ):
        with pytest.raises(WasiToolError, match=message) as info:
            check_example_input(model, bad)
        assert "\n" not in str(info.value)
    assert model.training  # its mode is restored
    for key, value in model.state_dict().items():  # batch-norm statistics did not move
        assert torch.equal(value, state[key]), key


# -- 5. nothing left in TMPDIR, success or failure ---------------------------------------------


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


T = ["--random-init", "--arch", TINY_ARCH, "--img-size", "32"]


def _commands(
    art: Path, onnx: Path, recipe: Path, out: Path
) -> dict[str, tuple[list[str], list[str]]]:
    """Each command: a run that succeeds and one that fails."""
    return {
        "compress": ([*T, "--rank-ratio", "0.5", "--out", f"{out}/c"], [*T, "--eps", "2", "--out", f"{out}/x"]),
        "finetune": ([str(art), "--epochs", "1", "--max-steps", "1", "--batch-size", "8", "--out", f"{out}/f"], [str(art), "--lr", "1e30", "--epochs", "1", "--max-steps", "1", "--batch-size", "8", "--out", f"{out}/x"]),
        "export": ([str(art), "--out", f"{out}/e"], [str(art), "--opset", "13", "--out", f"{out}/x"]),
        "bench": ([str(onnx), "--repeats", "1", "--warmup", "0", "--json", f"{out}/b.json"], [str(onnx), "--device", "pi9"]),
        "info": ([str(art), "--json", f"{out}/i.json"], [str(art), "--json", str(art / "manifest.json")]),
        "eval": ([f"{out}/f", "--data", "digits", "--json", f"{out}/v.json"], [str(art), "--data", "nosuchdata"]),
        "run": ([str(recipe), "--out", f"{out}/r"], [str(recipe), "--set", "c.speed=2", "--out", f"{out}/x"]),
        "federate": ([str(art), "--data", "digits", "--clients", "1", "--rounds", "1", "--max-steps", "1", "--batch-size", "8", "--out", f"{out}/fed"], [str(art), "--data", "digits", "--clients", "100000", "--out", f"{out}/x"]),
    }  # fmt: skip


@pytest.mark.slow
def test_no_command_leaves_anything_in_tmpdir(
    art: Path, tmp_path: Path, private_tmp: Path, tiny_onnx: Callable[..., Path]
) -> None:
    pytest.importorskip("flwr")
    onnx = tiny_onnx(tmp_path / "tiny.onnx")
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[[stages]]\nname = "c"\nkind = "compress"\nsource = { random_init = true, '
        f'arch = "{TINY_ARCH}", img_size = 32 }}\nrank_ratio = 0.5\n'
    )
    for command, (ok, bad) in _commands(art, onnx, recipe, tmp_path / "out").items():
        for argv, code in ((ok, 0), (bad, 1)):
            result = CliRunner().invoke(app, [command, *argv])
            assert result.exit_code == code, (command, result.output)
            gc.collect()
            assert _left(private_tmp) == [], (command, code)


# Two libraries keep a file of their own in TMPDIR, by design and shared by every process:
# onnxruntime writes its telemetry session id (.ses) when it is imported, torch its compile
# cache (torchinductor_<user>/). Neither is a temporary of the command.
LIBRARY_FILES = (".ses", "torchinductor_")


def _left(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if not p.name.startswith(LIBRARY_FILES))


@pytest.mark.slow
def test_a_gguf_load_leaves_no_tokenizer_folder(lm_dir: Path, tmp_path: Path) -> None:
    """The real CLI in a subprocess with a private TMPDIR: generate from a .gguf (success),
    and a .gguf run that fails after the load (a billion tokens): TMPDIR empty after both."""
    pytest.importorskip("gguf")
    import transformers

    from tests.models.llm_fixtures import CHAT_TEMPLATE, make_tokenizer, write_gguf

    model = transformers.LlamaForCausalLM.from_pretrained(str(lm_dir)).eval()
    gguf = write_gguf(tmp_path / "tiny.gguf", model, make_tokenizer(), CHAT_TEMPLATE)
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    for extra, code in ((["--max-new-tokens", "3"], 0), (["--max-new-tokens", "1000000000"], 1)):
        done = _cli("generate", str(gguf), "--prompt", "cat", *extra, env={"TMPDIR": str(tmp)})
        assert done.returncode == code, done.stderr
        assert _left(tmp) == []
    # in process: the folder goes with the model
    from wasi_tool.models import hf

    loaded_model, folder = hf.load_gguf(gguf)
    assert folder.is_dir() and (folder / "tokenizer.json").is_file()
    del loaded_model
    gc.collect()
    assert not folder.exists()
