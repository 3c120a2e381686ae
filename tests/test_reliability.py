# ruff: noqa: E501  (the corpus below is a table: one case per line reads best)
"""Reliability: interruption and resume (Ctrl-C mid-epoch, a real SIGKILL) and a corpus of
malformed inputs, each one line on stderr, exit 1, no traceback and nothing written."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import stat
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from wasi_tool import artifact
from wasi_tool.cli.app import app
from wasi_tool.models import ModelSource
from wasi_tool.stages import CompressConfig, FinetuneConfig, run_compress, run_finetune

# conftest's tiny model (tiny_spec["arch"]); a constant because CASES is built at import.
TINY_ARCH = "vit_tiny_patch16_224"
SRC = ModelSource(random_init=True, arch=TINY_ARCH, img_size=32)
CFG = FinetuneConfig(method="wasi", act_ranks=[8, 3, 16], epochs=2, batch_size=16, max_steps=4)
CLI_TRAIN = [
    "--random-init", "--arch", TINY_ARCH, "--img-size", "32", "--method", "wasi",
    "--act-ranks", "8,3,16", "--epochs", "3", "--batch-size", "16", "--max-steps", "4",
]  # fmt: skip


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return artifact.load_weights(out / "model.safetensors")[0]


def _same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def _epochs(out: Path) -> list[dict[str, Any]]:
    records = json.loads((out / "metrics.json").read_text())["epochs"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


class SigintAt:
    """Sends this process a real SIGINT after the given step (counted over the run)."""

    def __init__(self, at: int) -> None:
        self.at, self.steps = at, 0

    def start_epoch(self, *args: Any) -> None:
        pass

    def step(self, *args: Any) -> None:
        self.steps += 1
        if self.steps == self.at:
            os.kill(os.getpid(), signal.SIGINT)

    def end_epoch(self, record: dict[str, Any]) -> None:
        pass

    def note(self, message: str) -> None:
        pass


@pytest.mark.slow
def test_ctrl_c_mid_epoch_checkpoints_that_step_and_resume_is_exact(tmp_path: Path) -> None:
    straight = run_finetune(SRC, "digits", CFG, tmp_path / "a").out
    with pytest.raises(KeyboardInterrupt):
        run_finetune(SRC, "digits", CFG, tmp_path / "b", progress=SigintAt(6))  # epoch 2, step 2
    state = torch.load(tmp_path / "b.ckpt" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 2)
    resumed = run_finetune(SRC, "digits", CFG, tmp_path / "b", resume=True).out
    _same(straight, resumed)
    assert _epochs(straight) == _epochs(resumed)


@pytest.mark.slow
def test_cli_ctrl_c_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wasi_tool.cli import finetune as finetune_cmd

    original = finetune_cmd.RichProgress.step
    calls = {"n": 0}

    def step(self: Any, *args: Any) -> None:
        original(self, *args)
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(finetune_cmd.RichProgress, "step", step)
    result = CliRunner().invoke(app, ["finetune", *CLI_TRAIN, "--out", str(tmp_path / "o")])
    assert result.exit_code == 130
    # it says what was saved: the step in progress finished (not "the last finished epoch")
    assert "interrupted: the state after step 2 of " in result.stderr, result.stderr
    assert "in epoch 1 is saved in" in result.stderr and "continues from step 3" in result.stderr
    assert torch.load(tmp_path / "o.ckpt" / "last.pt", weights_only=True)["step"] == 2


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "wasi_tool", "finetune", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


# `python -m wasi_tool ARGV[2:]` that sends itself a real SIGKILL (no handler, no cleanup) at a
# known point: as it starts the backward pass of its 2nd training step after the checkpoint
# ARGV[1] first exists, i.e. mid-epoch 2 of 3, with the work done since that checkpoint lost.
KILL_MID_EPOCH_2 = """
import os, runpy, signal, sys
import torch
ckpt, after = sys.argv[1], []
backward = torch.autograd.backward  # what Tensor.backward calls
def backward_or_die(*args, **kwargs):
    if os.path.exists(ckpt):
        after.append(None)
        if len(after) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return backward(*args, **kwargs)
torch.autograd.backward = backward_or_die
sys.argv = ["wasi-tool", *sys.argv[2:]]
runpy.run_module("wasi_tool", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path: Path) -> None:
    assert _cli(*CLI_TRAIN, "--out", tmp_path / "a").returncode == 0
    out = tmp_path / "b"
    ckpt = tmp_path / "b.ckpt" / "last.pt"
    cmd = [sys.executable, "-c", KILL_MID_EPOCH_2, str(ckpt), "finetune", *CLI_TRAIN]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == -signal.SIGKILL, (
        "the run finished before it could be killed",
        proc.stderr,
    )
    assert ckpt.exists() and not out.exists()
    state = torch.load(ckpt, weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 0)  # the end of epoch 1: the last checkpoint
    resumed = _cli(*CLI_TRAIN, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _same(tmp_path / "a", out)
    assert _epochs(tmp_path / "a") == _epochs(out)


# -- the corpus of malformed inputs ------------------------------------------------------------


@pytest.fixture(scope="module")
def files(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Callable[..., nn.Module],
    tiny_onnx: Callable[..., Path],
) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("corpus")
    model = tiny_model()
    f: dict[str, Path] = {}
    f["pth"] = d / "tiny.pth"
    torch.save(model.state_dict(), f["pth"])
    good = d / "good.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(good))
    f["truncated"] = d / "truncated.safetensors"
    f["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    art = run_compress(SRC, CompressConfig(rank_ratio=0.5), d / "artifact").out
    f["artifact"] = art
    for name, edit in {
        "flipped": None,
        "version": lambda m: {**m, "format_version": 99},
        "missing": lambda m: {k: v for k, v in m.items() if k != "layers"},
        "notjson": "garbage",
    }.items():
        copy = d / f"art-{name}"
        copy.mkdir()
        for p in art.iterdir():
            (copy / p.name).write_bytes(p.read_bytes())
        manifest = json.loads((copy / "manifest.json").read_text())
        if name == "flipped":
            blob = bytearray((copy / "model.safetensors").read_bytes())
            blob[len(blob) // 2] ^= 0x01
            (copy / "model.safetensors").write_bytes(bytes(blob))
        elif name == "notjson":
            (copy / "manifest.json").write_text("{not json")
        else:
            (copy / "manifest.json").write_text(json.dumps(edit(manifest)))  # type: ignore[operator]
        f[f"art-{name}"] = copy
    f["randpt"] = d / "random.pt"
    f["randpt"].write_bytes(np.random.default_rng(0).bytes(4096))
    f["pickled"] = d / "whole.pt"
    torch.save(model, f["pickled"])
    f["npy"] = d / "weights.npy"
    f["npy"].write_bytes(b"\x93NUMPY")
    f["plaindir"] = d / "plaindir"
    f["plaindir"].mkdir()
    f["emptydata"] = d / "emptydata"
    f["emptydata"].mkdir()
    (d / "badimages" / "cat").mkdir(parents=True)
    for k in range(4):
        (d / "badimages" / "cat" / f"{k}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    f["badimages"] = d / "badimages"
    f["npzkeys"] = d / "keys.npz"
    np.savez(f["npzkeys"], images=np.zeros((2, 8, 8), dtype=np.uint8))
    f["npzjunk"] = d / "junk.npz"
    f["npzjunk"].write_bytes(b"PK\x03\x04 definitely not a zip")

    class Evil:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.system, ("touch /tmp/wasi-tool-pwned",))

    (d / "cifar").mkdir()
    (d / "cifar" / "data_batch_1").write_bytes(pickle.dumps({"data": Evil(), "labels": [0]}))
    (d / "cifar" / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": [0]}))
    f["cifar"] = d / "cifar"
    f["toml_syntax"] = d / "syntax.toml"
    f["toml_syntax"].write_text('[pipeline]\nname = "x\n')
    f["toml_key"] = d / "key.toml"
    f["toml_key"].write_text(
        '[[stages]]\nname = "c"\nkind = "compress"\nsource = { random_init = true, '
        'arch = "vit_tiny_patch16_224" }\nepsilon = 0.5\n'
    )
    f["toml_ok"] = d / "ok.toml"
    f["toml_ok"].write_text(f["toml_key"].read_text().replace("epsilon", "eps"))
    f["junkonnx"] = d / "junk.onnx"
    f["junkonnx"].write_bytes(np.random.default_rng(1).bytes(3000))
    f["onnx"] = tiny_onnx(d / "tiny.onnx")
    f["afile"] = d / "afile"
    f["afile"].write_text("a regular file")
    # inputs, resume, recipes (issue 19b)
    for name, sidecar in {
        "otherarch": {"format": 1, "sha256": [], "fingerprint": {"arch": "deit_tiny_patch16_224"}},
        "nosidecar": None,
        "deepsidecar": "[" * 5000 + "]" * 5000,
    }.items():
        ckpt = d / f"resume-{name}.ckpt"
        ckpt.mkdir()
        torch.save({"epoch": 0}, ckpt / "last.pt")
        if sidecar is not None:
            text = sidecar if isinstance(sidecar, str) else json.dumps(sidecar)
            (ckpt / "last.json").write_text(text)
        f[f"resume-{name}"] = d / f"resume-{name}"
    recipe = f["toml_ok"].read_text()
    f["toml_deep"] = d / "deep.toml"
    f["toml_deep"].write_text(recipe + "classes = " + "[" * 3000 + "]" * 3000 + "\n")
    f["toml_dot"] = d / "dot.toml"
    f["toml_dot"].write_text(recipe.replace('name = "c"', 'name = "."'))
    f["toml_abs"] = d / "abs.toml"
    f["toml_abs"].write_text(recipe.replace('name = "c"', 'name = "/tmp/x"'))

    # weights and data a float model cannot train from (issue 19: one validator each)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    blocks0 = "blocks.0.mlp.fc1.weight"
    for name, edit in {
        "int8": lambda t: t.to(torch.int8),
        "bool": lambda t: t > 0,
        "nan": lambda t: t.clone().index_fill_(0, torch.tensor([3]), float("nan")),
        "inf": lambda t: t.clone().index_fill_(1, torch.tensor([0]), float("inf")),
    }.items():
        f[f"w-{name}"] = d / f"weights-{name}.safetensors"
        save_file({**state, blocks0: edit(state[blocks0])}, str(f[f"w-{name}"]))
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, (8, 8, 8, 3)).astype(np.float32)
    labels = np.arange(8) % 2
    for name, (x, y) in {
        "nanpix": (np.where(pix > 250, np.nan, pix), labels),
        "bigpix": (pix * 4, labels),
        "negpix": (pix.astype(np.int16) - 300, labels),
        "strpix": (pix.astype(str), labels),
        "floatlabels": (pix, labels + 0.5),
        "strlabels": (pix, labels.astype(str)),
        "zeropx": (np.zeros((8, 0, 8, 3), np.uint8), labels),
        "fivechannels": (np.zeros((8, 8, 8, 5), np.uint8), labels),
    }.items():
        f[f"npz-{name}"] = d / f"{name}.npz"
        np.savez(f[f"npz-{name}"], x_train=x, y_train=y, x_test=x, y_test=y)
    # a .npz whose x_train declares 4e14 bytes: a header, no data (a compressed bomb's shape)
    f["npz-bomb"] = d / "bomb.npz"
    with zipfile.ZipFile(f["npz-bomb"], "w") as zf:
        with zf.open("x_train.npy", "w") as member:
            np.lib.format.write_array_header_1_0(
                member, {"descr": "|u1", "fortran_order": False, "shape": (10**8, 2000, 2000)}
            )
        for k in ("y_train", "x_test", "y_test"):
            with zf.open(f"{k}.npy", "w") as member:
                np.lib.format.write_array(member, np.zeros(2, np.uint8))
    for name, meta in {"metalist": ["airplane"], "metajunk": b"\x80\x04 junk"}.items():
        (d / name).mkdir()
        for batch in ("data_batch_1", "test_batch"):
            blob = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}
            (d / name / batch).write_bytes(pickle.dumps(blob))
        raw = meta if isinstance(meta, bytes) else pickle.dumps(meta)
        (d / name / "batches.meta").write_bytes(raw)
        f[f"cifar-{name}"] = d / name
    (d / "cifarrows").mkdir()
    for batch in ("data_batch_1", "test_batch"):
        blob = {"data": np.zeros((2, 1000), np.uint8), "labels": [0, 1]}
        (d / "cifarrows" / batch).write_bytes(pickle.dumps(blob))
    f["cifar-rows"] = d / "cifarrows"
    # a PNG whose header declares 30000 x 30000 px (Pillow refuses it before decoding)
    for k in range(2):
        (d / "bomb" / f"c{k}").mkdir(parents=True)
        for j in range(2):
            (d / "bomb" / f"c{k}" / f"{j}.png").write_bytes(_png_header(30000, 30000))
    f["pngbomb"] = d / "bomb"

    # found by the independent corpus (corpus2)
    f["toml_escape"] = d / "escape.toml"
    f["toml_escape"].write_text('[pipeline]\nname = "../../escaped"\n' + recipe)
    f["toml_types"] = d / "types.toml"
    f["toml_types"].write_text(recipe + 'force = "yes"\n')
    os.mkfifo(d / "fifo.safetensors")
    f["fifo"] = d / "fifo.safetensors"
    (d / "elsewhere.ckpt").mkdir()
    (d / "elsewhere.ckpt" / "last.pt").write_bytes(b"x")
    (d / "linked.ckpt").symlink_to(d / "elsewhere.ckpt")
    f["linked"] = d / "linked"
    for name in ("manifestlink", "ghost", "abslisted"):
        copy = d / f"art-{name}"
        copy.mkdir()
        for p in art.iterdir():
            (copy / p.name).write_bytes(p.read_bytes())
        f[f"art-{name}"] = copy
    (d / "art-manifestlink" / "manifest.json").rename(d / "manifest-elsewhere.json")
    (d / "art-manifestlink" / "manifest.json").symlink_to(d / "manifest-elsewhere.json")
    for name, listed in {"ghost": "ghost.bin", "abslisted": "/etc/passwd"}.items():
        manifest = json.loads((d / f"art-{name}" / "manifest.json").read_text())
        manifest["files"][listed] = {"sha256": "0" * 64, "bytes": 1}
        (d / f"art-{name}" / "manifest.json").write_text(json.dumps(manifest))

    # output safety (issue 19a)
    f["mine"] = d / "mine"  # a directory wasi-tool did not write
    f["mine"].mkdir()
    (f["mine"] / "notes.txt").write_text("keep me")
    (d / "thesis.ckpt").mkdir()  # not a checkpoint folder, only its name is
    (d / "thesis.ckpt" / "chapter1.tex").write_text("keep me")
    f["thesis"] = d / "thesis"
    f["outlink"] = d / "outlink"  # an output path that is a symlink (to an artifact)
    f["outlink"].symlink_to(art)
    f["danglink"] = d / "danglink"
    f["danglink"].symlink_to(d / "nowhere")
    for name in ("symlink", "toklink", "escape"):
        copy = d / f"art-{name}"
        copy.mkdir()
        for p in art.iterdir():
            (copy / p.name).write_bytes(p.read_bytes())
        f[f"art-{name}"] = copy
    (d / "art-symlink" / "model.safetensors").rename(d / "elsewhere.safetensors")
    (d / "art-symlink" / "model.safetensors").symlink_to(d / "elsewhere.safetensors")
    (d / "art-toklink" / "tokenizer.json").symlink_to(f["afile"])
    escape = json.loads((d / "art-escape" / "manifest.json").read_text())
    escape["files"]["../afile"] = {"sha256": "0" * 64, "bytes": 14}
    (d / "art-escape" / "manifest.json").write_text(json.dumps(escape))
    _issue31_files(d, art, f)
    return f


def _issue31_files(d: Path, art: Path, f: dict[str, Path]) -> None:
    """Inputs of issue 31: outputs onto inputs, unbounded work, federated inputs."""
    from tests.models.llm_fixtures import save_llama_lm

    # a node that is not a regular file: a character device (the null device's numbers; made
    # here, never /dev itself) where mknod is allowed, else a socket
    f["devnode"] = d / "devnode"
    try:
        os.mknod(f["devnode"], 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(f["devnode"]))
        sock.close()
    for name in ("sparse", "layers", "kwargs"):
        copy = d / f"art-{name}"
        copy.mkdir()
        for p in art.iterdir():
            (copy / p.name).write_bytes(p.read_bytes())
        f[f"art-{name}"] = copy
    os.truncate(d / "art-sparse" / "model.safetensors", 1 << 40)  # 1 TiB, sparse: no data
    manifest = json.loads((art / "manifest.json").read_text())
    layer = {"name": "blocks.0.mlp.fc1", "out_features": 8, "in_features": 8, "rank": 2}
    (d / "art-layers" / "manifest.json").write_text(
        json.dumps({**manifest, "layers": [layer] * 300_000})
    )
    model = {**manifest["model"], "kwargs": ["num_classes", 10]}
    (d / "art-kwargs" / "manifest.json").write_text(json.dumps({**manifest, "model": model}))
    # a tiny causal LM, and its copy whose chat template loops (a Jinja "CPU bomb")
    f["lm"] = save_llama_lm(d / "lm")
    f["lmloop"] = d / "lmloop"
    f["lmloop"].mkdir()
    for p in f["lm"].iterdir():
        (f["lmloop"] / p.name).write_bytes(p.read_bytes())
    (f["lmloop"] / "chat_template.jinja").write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    )
    f["longprompts"] = d / "longprompts.jsonl"  # 10 MB lines, cut before the tokenizer
    rows = [{"prompt": "grinning face " * 700_000, "response": "x"}] * 2
    f["longprompts"].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # federated data: client folders with different class sets; 16 samples for 20 clients
    rng = np.random.default_rng(0)
    (d / "folders").mkdir()
    for name, classes in (("a", 2), ("b", 5)):
        x = rng.integers(0, 256, (10, 8, 8, 3)).astype(np.uint8)
        y = np.arange(10) % classes
        np.savez(d / "folders" / f"{name}.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    f["folders"] = d / "folders"
    x = rng.integers(0, 256, (16, 8, 8, 3)).astype(np.uint8)
    f["sixteen"] = d / "sixteen.npz"
    np.savez(f["sixteen"], x_train=x, y_train=np.arange(16) % 2, x_test=x, y_test=np.arange(16) % 2)
    # an interrupted run's state whose history is a string
    f["fedout"] = d / "fedout"
    (d / "fedout.fedstate").mkdir()
    meta = {"fedstate": json.dumps({"identity": {}, "history": "round 1"})}
    save_file({"w": torch.zeros(2)}, str(d / "fedout.fedstate" / "state.safetensors"), meta)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that is only its signature, an IHDR of ``width`` x ``height`` and an IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


T = ["--arch", TINY_ARCH, "--img-size", "32"]
CASES: dict[str, tuple[list[str], str]] = {
    "missing checkpoint": (["compress", "{d}/absent.pth", *T], "no such file"),
    "truncated safetensors": (["compress", "{truncated}", *T], "cannot read safetensors"),
    "bit-flipped weights": (["compress", "{art-flipped}"], "does not match its sha256"),
    "random bytes as .pt": (["compress", "{randpt}", *T], "not a PyTorch file, or corrupt"),
    "pickled module": (["compress", "{pickled}"], "--trust-pickle"),
    "unsupported suffix": (["compress", "{npy}", *T], "unsupported checkpoint"),
    "directory, no manifest": (["compress", "{plaindir}", *T], "not a wasi-tool artifact"),
    "manifest wrong version": (["compress", "{art-version}"], "format_version 99 is not supported"),
    "manifest missing keys": (["compress", "{art-missing}"], "missing key 'layers'"),
    "manifest not json": (["compress", "{art-notjson}"], "cannot read"),
    "eps 0": (["compress", "{pth}", *T, "--eps", "0"], "eps must be in (0, 1]"),
    "eps 1.5": (["compress", "{pth}", *T, "--eps", "1.5"], "eps must be in (0, 1]"),
    "eps nan": (["compress", "{pth}", *T, "--eps", "nan"], "eps must be in (0, 1]"),
    "rank larger than the layer": (["compress", "{pth}", *T, "--rank-ratio", "2"], "rank_ratio must be in (0, 1]"),
    "weights of another arch": (["compress", "{pth}", "--arch", "deit_small_patch16_224", "--img-size", "32"], "weights do not fit"),
    "wrong number of classes": (["compress", "{pth}", *T, "--num-classes", "7"], "shape mismatch (head"),
    "unknown arch": (["compress", "{pth}", "--arch", "vit_tiny_patch16_2244"], "unknown architecture"),
    "output path under a file": (["compress", "{pth}", *T, "--out", "{afile}/out"], "cannot create output"),
    "empty dataset folder": (["finetune", "--random-init", *T, "--data", "{emptydata}"], "no class folders"),
    "unreadable image": (["finetune", "--random-init", *T, "--data", "{badimages}", "--val-fraction", "0.5"], "cannot read image"),
    "npz without keys": (["finetune", "--random-init", *T, "--data", "{npzkeys}"], "lacks the arrays"),
    "npz that is not a zip": (["finetune", "--random-init", *T, "--data", "{npzjunk}"], "cannot read"),
    "CIFAR batch with code": (["finetune", "--random-init", *T, "--data", "{cifar}"], "refusing to load"),
    "bad act ranks": (["finetune", "--random-init", *T, "--act-ranks", "8,;3"], "comma-separated integers"),
    "resume with nothing to resume": (["finetune", "--random-init", *T, "--resume"], "nothing to resume"),
    "export opset 13": (["export", "{artifact}", "--opset", "13"], "opset must be >= 17"),
    "export a corrupt artifact": (["export", "{art-flipped}"], "does not match its sha256"),
    "TOML syntax error": (["run", "{toml_syntax}"], "TOML syntax error"),
    "TOML unknown key": (["run", "{toml_key}"], "key.toml:5: unknown key 'epsilon'"),
    "missing recipe": (["run", "{d}/absent.toml"], "no such recipe"),
    "bad --set": (["run", "{toml_ok}", "--set", "oops"], "--set takes stage.key=value"),
    "--set of an unknown setting": (["run", "{toml_ok}", "--set", "c.speed=2"], "has no setting 'speed'"),
    "random bytes as ONNX": (["bench", "{junkonnx}"], "not a readable ONNX model"),
    "missing ONNX": (["bench", "{d}/absent.onnx"], "no such ONNX file"),
    "unknown device profile": (["bench", "{onnx}", "--device", "pi9"], "unknown device profile"),
    "ssh target with shell metacharacters": (["bench", "{onnx}", "--ssh", "pi@host; rm -rf ~"], "--ssh takes user@host[:port]"),
    "ssh target with spaces": (["bench", "{onnx}", "--ssh", "p i@my host"], "--ssh takes user@host[:port]"),
    "generate from a missing artifact": (["generate", "{d}/absent", "--prompt", "hi"], "no such file or directory"),
    "generate from an image model": (["generate", "{artifact}", "--prompt", "hi"], "image model, not a causal language model"),
    "federate with an unknown partition": (["federate", "{artifact}", "--data", "digits", "--partition", "zipf:2"], "partition must be iid, dirichlet:ALPHA or folders"),
    "federate with no clients": (["federate", "{artifact}", "--data", "digits", "--clients", "0"], "clients must be >= 1"),
    "info of a missing artifact": (["info", "{d}/absent"], "no such file or directory"),
    "info of a plain file": (["info", "{afile}"], "is not a wasi-tool artifact"),
    "info of a bit-flipped artifact": (["info", "{art-flipped}"], "1 file(s) do not match the manifest: model.safetensors"),
    "eval of a missing artifact": (["eval", "{d}/absent", "--data", "digits"], "no such file or directory"),
    "eval on an unknown dataset": (["eval", "{artifact}", "--data", "nosuchdata"], "no such dataset"),
    "eval of a corrupt artifact": (["eval", "{art-flipped}", "--data", "digits"], "does not match its sha256"),
    # inputs, resume, recipes (issue 19b)
    "one step at lr 1e30 (weights overflow)": (["finetune", "--random-init", *T, "--epochs", "1", "--max-steps", "1", "--batch-size", "8", "--lr", "1e30"], "training diverged: weight"),
    "one vanilla step at lr 1e30 (held-out loss nan)": (["finetune", "--random-init", *T, "--method", "vanilla", "--epochs", "1", "--max-steps", "1", "--batch-size", "8", "--lr", "1e30"], "held-out loss is nan at the end of epoch 1, step 1 (not checkpointed); nothing was saved"),
    "resume a checkpoint of another arch": (["finetune", "--random-init", *T, "--resume", "--out", "{resume-otherarch}"], "is for arch deit_tiny_patch16_224, this run is vit_tiny_patch16_224"),
    "resume a checkpoint without its sidecar": (["finetune", "--random-init", *T, "--resume", "--out", "{resume-nosidecar}"], "has no last.json beside it"),
    "resume with a deeply nested sidecar": (["finetune", "--random-init", *T, "--resume", "--out", "{resume-deepsidecar}"], "nested more than 64 levels"),
    "deeply nested recipe": (["run", "{toml_deep}"], "nested more than 64 levels"),
    "deeply nested --set value": (["run", "{toml_ok}", "--set", "c.exclude=" + "[" * 3000 + "]" * 3000], "a --set value is nested more than 64"),
    "stage named .": (["run", "{toml_dot}"], "each stage needs a plain name"),
    "stage named /tmp/x": (["run", "{toml_abs}"], "each stage needs a plain name"),
    "--set a string where an int belongs": (["run", "{toml_ok}", "--set", "c.rank_ratio=half"], "--set c.rank_ratio=half: rank_ratio takes float | None, got 'half'"),
    "negative --seed": (["finetune", "--random-init", *T, "--seed", "-1"], "seed must be >= 0, got -1"),
    "bench --batch-size 0": (["bench", "{onnx}", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    # weights a float model cannot train from, at every command that loads a checkpoint
    "int8 weights": (["compress", "{w-int8}", *T], "weight blocks.0.mlp.fc1.weight is int8, not floating point"),
    "bool weights": (["finetune", "{w-bool}", *T], "weight blocks.0.mlp.fc1.weight is bool, not floating point"),
    "NaN weights": (["compress", "{w-nan}", *T], "blocks.0.mlp.fc1.weight holds 192 non-finite values"),
    "inf weights": (["export", "{w-inf}", *T], "blocks.0.mlp.fc1.weight holds 768 non-finite values"),
    # data: pixels, labels, shapes and sizes, at dataset load
    "NaN pixels": (["finetune", "--random-init", *T, "--data", "{npz-nanpix}"], "pixels are NaN or infinite"),
    "float pixels above 255": (["finetune", "--random-init", *T, "--data", "{npz-bigpix}"], "expected uint8 0-255, or floats in [0, 1]"),
    "negative integer pixels": (["eval", "--random-init", *T, "--data", "{npz-negpix}"], "pixel values span [-300"),
    "string pixels": (["finetune", "--random-init", *T, "--data", "{npz-strpix}"], "pixels must be numbers, got dtype <U"),
    "float labels": (["finetune", "--random-init", *T, "--data", "{npz-floatlabels}"], "labels must be integers, got float64"),
    "string labels": (["eval", "--random-init", *T, "--data", "{npz-strlabels}"], "labels must be integers, got <U"),
    "images of 0 px": (["finetune", "--random-init", *T, "--data", "{npz-zeropx}"], "images of 0x8 px; each side must be 1..8192"),
    "images with 5 channels": (["finetune", "--random-init", *T, "--data", "{npz-fivechannels}"], "got (8, 8, 8, 5)"),
    "npz declaring 400 TB": (["finetune", "--random-init", *T, "--data", "{npz-bomb}"], "x_train would decode to 400000.0 GB"),
    "CIFAR meta that is a list": (["finetune", "--random-init", *T, "--data", "{cifar-metalist}"], "is not a CIFAR meta file: expected a dict whose 'label_names' lists 2 class names, found list"),
    "CIFAR meta that is corrupt": (["eval", "--random-init", *T, "--data", "{cifar-metajunk}"], "cannot read CIFAR meta file"),
    "CIFAR rows of 1000 bytes": (["finetune", "--random-init", *T, "--data", "{cifar-rows}"], "'data' is not CIFAR's rows of 3072 pixel bytes"),
    "decompression-bomb image": (["finetune", "--random-init", *T, "--data", "{pngbomb}", "--val-fraction", "0.5"], "could be decompression bomb"),
    "image smaller than the patch": (["finetune", "--random-init", "--arch", TINY_ARCH, "--img-size", "8"], "smaller than"),
    "--set targets that are not globs": (["run", "{toml_ok}", "--set", "c.targets=mlp;rm -rf ~"], "targets item 'mlp;rm -rf ~' is not a module-name glob"),
    "exclude with a path": (["compress", "{pth}", *T, "--exclude", "../../etc/passwd"], "exclude item '../../etc/passwd' is not a module-name glob"),
    # found by the independent corpus (corpus2)
    "pipeline name that is a path": (["run", "{toml_escape}"], "the pipeline needs a plain name"),
    "recipe value of the wrong type": (["run", "{toml_types}"], "force takes bool, got 'yes'"),
    "a FIFO as the checkpoint": (["compress", "{fifo}", *T], "is not a regular file or a directory"),
    "resume into a linked <out>.ckpt": (["finetune", "--random-init", *T, "--resume", "--out", "{linked}"], "linked.ckpt is not a wasi-tool checkpoint"),
    "seed of 2**70": (["compress", "--random-init", *T, "--seed-init", str(2**70)], "seed must be in 0..2**63-1"),
    "negative --seed-init": (["export", "--random-init", *T, "--seed-init", "-1"], "seed must be in 0..2**63-1, got -1"),
    "federate with 100000 clients": (["federate", "{artifact}", "--data", "digits", "--clients", "100000"], "clients must be <= 10000"),
    "federate dirichlet:inf": (["federate", "{artifact}", "--data", "digits", "--partition", "dirichlet:inf"], "dirichlet needs a positive, finite alpha"),
    "eval predictions under a file": (["eval", "--random-init", *T, "--num-classes", "10", "--data", "digits", "--predictions", "{afile}/p.csv"], "cannot write"),
    "a symlinked manifest": (["export", "{art-manifestlink}"], "manifest.json is a symbolic link"),
    "a manifest listing a missing file": (["export", "{art-ghost}"], "is missing ghost.bin, which its manifest lists"),
    "a manifest listing an absolute path": (["info", "{art-abslisted}"], "files lists '/etc/passwd', not a plain file name"),
    "--task for an image model": (["finetune", "--random-init", *T, "--task", "classify"], "image model: task classify is for Hugging Face models"),
    # output safety (issue 19a)
    "--overwrite of a plain directory": (["compress", "{pth}", *T, "--out", "{mine}", "--overwrite"], "is not a wasi-tool artifact (no valid manifest.json); refusing to replace it"),
    "export --overwrite of a plain directory": (["export", "{artifact}", "--out", "{mine}", "--overwrite"], "is not a wasi-tool artifact (no valid manifest.json); refusing to replace it"),
    "finetune --overwrite of a plain directory": (["finetune", "--random-init", *T, "--out", "{mine}", "--overwrite"], "is not a wasi-tool artifact (no valid manifest.json); refusing to replace it"),
    "finetune --overwrite of a <out>.ckpt that is not a checkpoint": (["finetune", "--random-init", *T, "--out", "{thesis}", "--overwrite"], "thesis.ckpt is not a wasi-tool checkpoint (it holds other files, or is a link or a file); refusing to delete it"),
    "--overwrite of an output that is a symlink": (["compress", "{pth}", *T, "--out", "{outlink}", "--overwrite"], "outlink is a symbolic link; refusing to replace it"),
    "output is a dangling symlink": (["compress", "{pth}", *T, "--out", "{danglink}"], "danglink already exists"),
    "symlinked weights in an artifact": (["compress", "{art-symlink}"], "model.safetensors is a symbolic link"),
    "export of symlinked weights": (["export", "{art-symlink}"], "model.safetensors is a symbolic link"),
    "info of symlinked weights": (["info", "{art-symlink}"], "model.safetensors is a symbolic link"),
    "symlinked tokenizer in an artifact": (["compress", "{art-toklink}"], "tokenizer.json is a symbolic link"),
    "manifest naming a file outside": (["info", "{art-escape}"], "files lists '../afile', not a plain file name"),
    # option values out of their range, every command that takes them
    "finetune --threads 0": (["finetune", "--random-init", *T, "--threads", "0"], "threads must be between 1 and 1024, got 0"),
    "bench --threads 0": (["bench", "{onnx}", "--threads", "0"], "threads must be between 1 and 1024, got 0"),
    "run --threads 0": (["run", "{toml_ok}", "--threads", "0"], "threads must be between 1 and 1024, got 0"),
    "doctor --assume without a version": (["doctor", "--assume", "torch"], "--assume takes NAME==VERSION items"),
    "doctor --cpuinfo missing": (["doctor", "--cpuinfo", "/nonexistent/wasi-tool-cpuinfo"], "cannot read"),
    "federate --server-lr 0": (["federate", "{artifact}", "--data", "digits", "--server-lr", "0"], "server_lr must be in (0, 100], got 0.0"),
    "federate min clients above clients": (["federate", "{artifact}", "--data", "digits", "--clients", "2", "--min-clients", "3"], "min_clients 3 > clients 2"),
    "federate dirichlet with a negative alpha": (["federate", "{artifact}", "--data", "digits", "--partition", "dirichlet:-1"], "dirichlet needs a positive, finite alpha"),
    "eval with bad --classes": (["eval", "{artifact}", "--data", "digits", "--classes", "a,b"], "--classes takes comma-separated integers"),
    "unknown memory mode": (["finetune", "--random-init", *T, "--memory-mode", "sometimes"], "memory_mode must be one of off, block, mlp, attn"),
    "unknown lossy storage": (["finetune", "--random-init", *T, "--lossy", "fp8"], "lossy must be one of off, bf16"),
    "memory budget that is not a size": (["finetune", "--random-init", *T, "--memory-budget", "lots"], "give a size like 1.2GB or 800MB"),
    "targets matching nothing": (["compress", "{pth}", *T, "--targets", "nothing*"], "no linear layer matches targets 'nothing*'"),
    "exclude everything": (["compress", "{pth}", *T, "--exclude", "*"], "minus exclude '*'"),
    "targets mlp@last0": (["finetune", "--random-init", *T, "--targets", "mlp@last0"], "targets mlp@last0: N must be >= 1"),
    "classes not in the data": (["finetune", "--random-init", *T, "--data", "digits", "--classes", "3,42"], "classes [42] are not in 0..9"),
    "unknown method": (["finetune", "--random-init", *T, "--method", "adamw"], "unknown method 'adamw'"),
    "int8 agreement above 1": (["export", "{artifact}", "--int8", "--min-agreement", "2"], "min_agreement must be in [0, 1], got 2.0"),
    # issue 31: an output that would destroy an input (one output-path rule)
    "info --json onto its own manifest": (["info", "{artifact}", "--json", "{artifact}/manifest.json"], "is inside the input artifact"),
    "eval --predictions onto the input's weights": (["eval", "{artifact}", "--data", "digits", "--predictions", "{artifact}/model.safetensors"], "is inside the input artifact"),
    "eval --predictions onto a device node": (["eval", "{artifact}", "--data", "digits", "--predictions", "{devnode}"], "not a regular file; refusing to write over it"),
    "info --json onto a FIFO": (["info", "{artifact}", "--json", "{fifo}"], "is a FIFO, not a regular file"),
    "compress --overwrite of its own input": (["compress", "{artifact}", "--out", "{artifact}", "--overwrite"], "is an input of this command"),
    "export --out inside its input": (["export", "{artifact}", "--out", "{artifact}/onnx"], "is inside the input artifact"),
    "finetune --json onto its checkpoint": (["finetune", "{pth}", *T, "--json", "{pth}"], "is an input of this command"),
    "bench --json onto the model it times": (["bench", "{onnx}", "--json", "{onnx}"], "is an input of this command"),
    "federate --overwrite of its start": (["federate", "{artifact}", "--data", "digits", "--out", "{artifact}", "--overwrite"], "is an input of this command"),
    # issue 31: work that is never bounded
    "generate --max-new-tokens 1000000000": (["generate", "{lm}", "--prompt", "hi", "--max-new-tokens", "1000000000"], "exceeds the model's context of 256 tokens"),
    "generate with a 1 MB prompt": (["generate", "{lm}", "--prompt", "grinning face " * 75_000], "the prompt is more than 256 tokens"),
    "generate with a chat template that loops": (["generate", "{lmloop}", "--prompt", "hi"], "chat template ran more than 1000000 steps"),
    "generate --temperature nan": (["generate", "{lm}", "--prompt", "hi", "--temperature", "nan"], "temperature must be a finite number >= 0, got nan"),
    ".jsonl of 10 MB prompts": (["eval", "{lm}", "--data", "{longprompts}", "--seq-len", "32"], "no example fits in 32 tokens"),
    "weights of 1 TiB (sparse)": (["export", "{art-sparse}"], "is 1099511627776 bytes, its manifest records"),
    "info of 300,000 layer records": (["info", "{art-layers}"], "300000 layers records, more than the 20000 allowed"),
    "info of model kwargs that are a list": (["info", "{art-kwargs}"], "model kwargs must be an object, got list"),
    # issue 31: federated inputs
    "federate folders of different class sets": (["federate", "{artifact}", "--data", "{folders}", "--partition", "folders", "--clients", "2"], "every client needs the same class set"),
    "federate 20 clients on 16 samples": (["federate", "{artifact}", "--data", "{sixteen}", "--clients", "20"], "16 training samples cannot be split among 20 clients"),
    "federate --resume of a history that is a string": (["federate", "{artifact}", "--data", "digits", "--out", "{fedout}", "--resume"], "history must be a list of rounds, got str"),
}  # fmt: skip
NO_OUT = {"doctor", "generate", "info", "eval"}  # commands that write nothing (eval: only if asked)


# Cases that run real work before they fail (over ~5 s): marked slow, still run by default.
SLOW_CASES = {
    "resume with nothing to resume",
    "output path under a file",
    "one step at lr 1e30 (weights overflow)",
    "one vanilla step at lr 1e30 (held-out loss nan)",
}


def _snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every entry under ``root`` with its mode, size, inode and mtime: a write, a
    replacement (a new inode) or a new file changes it (no file is read: one is 1 TiB)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            found[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_ino, st.st_mtime_ns)
    return found


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES]
)
def test_malformed_input_corpus(case: str, files: dict[str, Path], tmp_path: Path) -> None:
    args, expected = CASES[case]
    subs = {**{k: str(v) for k, v in files.items()}, "d": str(files["pth"].parent)}
    argv = [a.format(**subs) if "{" in a else a for a in args]
    out = tmp_path / "runs" / "out"
    if (
        "--out" not in argv
        and argv[0] not in NO_OUT
        and not (argv[0] == "bench" and "--json" in argv)
    ):
        argv += ["--out", str(out)] if argv[0] != "bench" else ["--json", str(out)]
    before = _snapshot(files["pth"].parent)
    result = CliRunner().invoke(app, argv)
    assert _snapshot(files["pth"].parent) == before, case  # inputs untouched, nothing added
    assert result.exit_code == 1, (case, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, result.stderr)
    assert expected in lines[0], (case, lines[0])
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()
    assert not Path("/tmp/wasi-tool-pwned").exists()


def test_corpus_is_large_enough_and_covers_every_cli_command() -> None:
    """The corpus must reach every command the CLI has, not only be long (a new command
    without malformed-input cases fails here)."""
    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    covered = {args[0] for args, _ in CASES.values()}
    assert commands and commands <= covered, f"no malformed-input case for {commands - covered}"
    assert len(CASES) >= 80
    assert SLOW_CASES.issubset(CASES)


@pytest.mark.slow
def test_full_disk_and_read_only_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import tempfile

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def read_only(*args: object, **kwargs: object) -> str:
        raise PermissionError(errno.EROFS, "Read-only file system")

    for patch, message in (
        ((artifact.io, "save_weights", no_space), "No space left on device"),
        ((tempfile, "mkdtemp", read_only), "Read-only file system"),
    ):
        with monkeypatch.context() as m:
            m.setattr(*patch)
            out = tmp_path / "runs" / "out"
            result = CliRunner().invoke(app, ["compress", "--random-init", *T, "--out", str(out)])
        assert result.exit_code == 1 and message in result.stderr
        assert len(result.stderr.splitlines()) == 1
        assert not (tmp_path / "runs").exists()
