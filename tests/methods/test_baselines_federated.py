"""The new baselines federate: two simulated clients, one round each (what travels is the
trainable state, as for every method: mezo sends all its parameters, not seeds and scalars;
lora-fa sends B and the head, A stays frozen on every client at the same seeded init)."""

from __future__ import annotations

from pathlib import Path

import pytest

from wasi_tool.artifact import read_manifest
from wasi_tool.models.loading import ModelSource
from wasi_tool.stages.compress import CompressConfig, run_compress

pytest.importorskip("flwr")


@pytest.fixture(scope="module")
def start(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fed") / "tiny-c"
    source = ModelSource(random_init=True, arch="vit_tiny_patch16_224", img_size=32, seed=0)
    run_compress(source, CompressConfig(targets="mlp", eps=0.8), out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "extra"),
    [("mezo", {"lr": 1e-4, "lr_min": 1e-4, "clip": None}), ("lora-fa", {}), ("asi-fixed", {})],
)
def test_two_clients_one_round(
    method: str, extra: dict[str, object], start: Path, tmp_path: Path
) -> None:
    from wasi_tool.federated import FederateConfig, run_federate

    fed = FederateConfig(
        method=method, batch_size=16, max_steps=2, seed=3, clients=2, rounds=1, epochs=1,
        partition="iid", **extra,  # type: ignore[arg-type]
    )  # fmt: skip
    run_federate(start, "digits", fed, tmp_path / "fed")
    history = read_manifest(tmp_path / "fed")["federated"]["history"]
    assert len(history) == 1 and history[0]["accepted"] == 2
    sent = [c["bytes_up"] for c in history[0]["clients"]]
    assert all(b > 0 for b in sent)
