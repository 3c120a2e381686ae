"""Federated runs in simulation (in-process LocalGrid): one client equals finetune, bad updates
are dropped and the round completes, a crashed client loses nothing, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wasi_tool.artifact import load_weights, read_manifest
from wasi_tool.errors import WasiToolError
from wasi_tool.federated import FederateConfig, run_federate
from wasi_tool.federated.server import STATE_FILE, state_dir
from wasi_tool.models.loading import ModelSource
from wasi_tool.stages.compress import CompressConfig, run_compress
from wasi_tool.stages.finetune import run_finetune
from wasi_tool.training.config import FinetuneConfig

pytest.importorskip("flwr")

RECIPE = {"method": "wasi", "batch_size": 64, "max_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def start(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fed") / "tiny-c"
    source = ModelSource(random_init=True, arch="vit_tiny_patch16_224", img_size=32, seed=0)
    run_compress(source, CompressConfig(targets="mlp", eps=0.8), out)
    return out


def test_one_client_with_all_data_equals_finetune(start: Path, tmp_path: Path) -> None:
    fed = FederateConfig(**RECIPE, clients=1, rounds=1, epochs=2, partition="iid")
    run_federate(start, "digits", fed, tmp_path / "fed")
    plain = FinetuneConfig(**RECIPE, epochs=2)
    run_finetune(ModelSource(checkpoint=start), "digits", plain, tmp_path / "plain")
    a, _ = load_weights(tmp_path / "fed" / "model.safetensors")
    b, _ = load_weights(tmp_path / "plain" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    history = read_manifest(tmp_path / "fed")["federated"]["history"]
    assert len(history) == 1 and history[0]["accepted"] == 1


def _corrupt(kind: str):
    def hook(node, sent, reply):
        if node != 1002:
            return reply
        arrays = reply.content.array_records["arrays"]
        from flwr.app import Array

        name = next(iter(arrays))
        value = arrays[name].numpy().copy()
        if kind == "nan":
            value.flat[0] = np.nan
        elif kind == "shape":
            value = value[..., :-1].copy()
        elif kind == "missing":
            return None
        arrays[name] = Array(value)
        return reply

    return hook


@pytest.mark.parametrize("kind", ["nan", "shape", "missing"])
def test_bad_update_is_dropped_and_the_round_completes(start, tmp_path, kind, caplog):
    cfg = FederateConfig(**{**RECIPE, "max_steps": 1}, clients=2, rounds=1, epochs=1)
    result = run_federate(start, "digits", cfg, tmp_path / "fed", hook=_corrupt(kind))
    (row,) = result.history
    status = {c["node"]: c["status"] for c in row["clients"]}
    assert status == {1001: "ok", 1002: "dropped" if kind != "missing" else "missing"}
    reason = next(c["reason"] for c in row["clients"] if c["node"] == 1002)
    expected = {"nan": "non-finite", "shape": "shape", "missing": "no reply"}[kind]
    assert expected in reason
    assert any(expected in r.message for r in caplog.records)
    weights, _ = load_weights(tmp_path / "fed" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_crash_keeps_the_server_state_and_resume_continues(start, tmp_path):
    cfg = FederateConfig(**{**RECIPE, "max_steps": 1}, clients=1, rounds=2, epochs=1)
    rounds = {"n": 0}

    def crash_in_round_two(node, sent, reply):
        rounds["n"] += 1
        if rounds["n"] == 2:
            raise KeyboardInterrupt  # the server process dies mid-round 2
        return reply

    out = tmp_path / "fed"
    with pytest.raises(KeyboardInterrupt):
        run_federate(start, "digits", cfg, out, hook=crash_in_round_two)
    saved = state_dir(out) / STATE_FILE
    assert saved.is_file() and not out.exists()
    meta = json.loads(load_weights(saved)[1]["fedstate"])
    assert [r["round"] for r in meta["history"]] == [1]
    with pytest.raises(WasiToolError, match="--resume"):
        run_federate(start, "digits", cfg, out)
    result = run_federate(start, "digits", cfg, out, resume=True)
    assert [r["round"] for r in result.history] == [1, 2]
    assert not state_dir(out).exists()
    manifest = read_manifest(out)
    assert manifest["stages"][-1]["stage"] == "federate"
    assert manifest["federated"]["history"][1]["clients"][0]["bytes_up"] > 0


def test_a_node_with_its_own_data_trains_on_all_of_it(start: Path) -> None:
    from types import SimpleNamespace

    from wasi_tool.federated.apps import participant
    from wasi_tool.federated.server import Task

    config = FederateConfig(**RECIPE, clients=2, partition="iid").to_dict()
    task = Task(str(start), "digits", config)
    shared = SimpleNamespace(node_config={"partition-id": 1, "num-partitions": 2})
    own = SimpleNamespace(node_config={**shared.node_config, "data": "digits"})
    share, _, _ = participant(task, shared)  # type: ignore[arg-type]
    n_share = len(share.train)
    whole, _, used = participant(task, own)  # type: ignore[arg-type]
    assert used.partition == "folders"
    assert 0 < n_share < len(whole.train)
