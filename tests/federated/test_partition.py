from __future__ import annotations

import numpy as np
import pytest

from wasi_tool.errors import WasiToolError
from wasi_tool.federated.partition import PartitionSpec, client_folders, split


def test_iid_covers_everything_once_and_is_seeded():
    labels = np.arange(103) % 5
    parts = split(labels, 4, PartitionSpec.parse("iid"), seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    again = split(labels, 4, PartitionSpec.parse("iid"), seed=1)
    assert all((a == b).all() for a, b in zip(parts, again, strict=True))


def test_dirichlet_skews_labels_more_at_small_alpha():
    labels = np.repeat(np.arange(5), 200)

    def skew(alpha: float) -> float:  # mean share of each client's top class
        parts = split(labels, 4, PartitionSpec.parse(f"dirichlet:{alpha}"), seed=0)
        assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
        return float(np.mean([np.bincount(labels[p], minlength=5).max() / len(p) for p in parts]))

    assert skew(0.1) > skew(100.0) + 0.2
    assert abs(skew(100.0) - 0.2) < 0.1


def test_bad_specs_and_folders(tmp_path):
    for bad in ("dirichlet", "dirichlet:-1", "shards"):
        with pytest.raises(WasiToolError):
            PartitionSpec.parse(bad)
    (tmp_path / "b").mkdir()
    (tmp_path / "a.npz").write_bytes(b"")
    assert [p.name for p in client_folders(tmp_path, 2)] == ["a.npz", "b"]
    with pytest.raises(WasiToolError, match="holds 2 client datasets"):
        client_folders(tmp_path, 3)
