"""The resume verifier (training/checkpoint.py): hash and fingerprint checked before
torch.load is trusted, the structure after; each refusal is one WasiToolError line."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.training import checkpoint
from wasi_tool.training.checkpoint import FILE, SIDECAR, fingerprint, load, save

ID = {"arch": "toy", "config": {"lr": 0.1}, "data": "digits"}


def _state(model: nn.Module, **extra: Any) -> dict[str, Any]:
    state: dict[str, Any] = {k: 0 for k in checkpoint.KEYS}
    return {**state, "model": model.state_dict(), **extra}


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, nn.Module]:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    save(tmp_path / "c", _state(model), fingerprint(model, ID))
    return tmp_path / "c", model


def test_a_good_checkpoint_loads(saved: tuple[Path, nn.Module]) -> None:
    d, model = saved
    state = load(d, fingerprint(model, ID))
    assert torch.equal(state["model"]["0.weight"], model[0].weight)
    assert sorted(p.name for p in d.iterdir()) == [SIDECAR, FILE]


def test_a_flipped_byte_is_refused(saved: tuple[Path, nn.Module]) -> None:
    d, model = saved
    data = bytearray((d / FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / FILE).write_bytes(bytes(data))
    with pytest.raises(WasiToolError, match="checkpoint hash mismatch"):
        load(d, fingerprint(model, ID))


def test_another_arch_or_model_is_refused(saved: tuple[Path, nn.Module]) -> None:
    d, model = saved
    with pytest.raises(WasiToolError, match="is for arch toy, this run is deit"):
        load(d, fingerprint(model, {**ID, "arch": "deit"}))
    with pytest.raises(WasiToolError, match="other settings or data"):
        load(d, fingerprint(model, {**ID, "data": "cifar"}))
    wider = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    with pytest.raises(WasiToolError, match=r"shape of 0.weight \[3, 4\] vs \[5, 4\]"):
        load(d, fingerprint(wider, ID))
    deeper = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(2, 2))
    with pytest.raises(WasiToolError, match=r"missing keys 2\.weight, 2\.bias"):
        load(d, fingerprint(deeper, ID))
    with pytest.raises(WasiToolError, match=r"unexpected keys 1\.weight, 1\.bias"):
        load(d, fingerprint(nn.Sequential(nn.Linear(4, 3)), ID))


def test_missing_or_hostile_sidecar(saved: tuple[Path, nn.Module]) -> None:
    d, model = saved
    good = (d / SIDECAR).read_text()
    (d / SIDECAR).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(WasiToolError, match="nested more than"):
        load(d, fingerprint(model, ID))
    (d / SIDECAR).write_text("{not json")
    with pytest.raises(WasiToolError, match="not JSON"):
        load(d, fingerprint(model, ID))
    (d / SIDECAR).write_text(json.dumps({**json.loads(good), "format": 9}))
    with pytest.raises(WasiToolError, match="not one this wasi-tool writes"):
        load(d, fingerprint(model, ID))
    (d / SIDECAR).unlink()
    with pytest.raises(WasiToolError, match=r"has no last\.json beside it"):
        load(d, fingerprint(model, ID))


def test_a_state_missing_keys_or_of_another_structure(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    partial = _state(model)
    del partial["optimizer"], partial["torch_rng"]
    save(tmp_path / "a", partial, fingerprint(model, ID))
    with pytest.raises(WasiToolError, match="is missing keys optimizer, torch_rng"):
        load(tmp_path / "a", fingerprint(model, ID))
    save(tmp_path / "b", [1, 2, 3], fingerprint(model, ID))  # type: ignore[arg-type]
    with pytest.raises(WasiToolError, match="holds a list, not a state"):
        load(tmp_path / "b", fingerprint(model, ID))


def test_full_disk_leaves_no_temp_file(
    saved: tuple[Path, nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, model = saved
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def no_space(obj: object, fh: Any) -> None:
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(WasiToolError, match=r"cannot write checkpoint .*No space left on device"):
        save(d, _state(model), fingerprint(model, ID))
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # no .last.pt.tmp, old pair


def test_a_crash_between_the_renames_still_verifies(
    saved: tuple[Path, nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, model = saved
    real = os.replace

    def crash_on_the_weights(src: Any, dst: Any) -> None:
        if Path(dst).name == FILE:
            raise KeyboardInterrupt  # SIGKILL between the sidecar's rename and the file's
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_the_weights)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save(d, _state(model), fingerprint(model, ID))
    monkeypatch.setattr(os, "replace", real)
    old = load(d, fingerprint(model, ID))  # the previous file, still accepted
    assert not torch.equal(old["model"]["0.weight"], model[0].weight)
