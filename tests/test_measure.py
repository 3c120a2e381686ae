"""The process measurements (the library floor counts weights that are really resident) and
the JSON the tool writes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from wasi_tool import artifact
from wasi_tool.measure import file_backed_bytes, library_floor, rss_bytes

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")


def test_floor_pages_in_memory_mapped_weights(tmp_path: Path) -> None:
    """Weights given to a model from safetensors' memory map (as the loader does, with
    ``assign``) are not resident until read. The floor subtracts them, so it must read them
    first: afterwards, reading every weight adds (almost) nothing to the resident size."""
    size = 64 * 2**20  # 64 MiB of weights
    path = tmp_path / "w.safetensors"
    save_file({"weight": torch.randn(size // 4 // 1024, 1024)}, str(path))
    tensors, _ = artifact.load_weights(path)
    model = nn.Linear(1024, size // 4 // 1024, bias=False, device="meta")
    model.load_state_dict(tensors, assign=True)
    before = file_backed_bytes()
    floor = library_floor(model)
    assert floor is not None and before is not None
    paged_in = file_backed_bytes() - before  # type: ignore[operator]
    rss = rss_bytes()
    float(model.weight.detach().sum())  # the first step reads every weight
    grown = rss_bytes() - rss  # type: ignore[operator]
    assert grown < 8 * 2**20, f"reading the weights after the floor added {grown / 2**20:.0f} MiB"
    # the pages came from the file (the floor read them), and the floor subtracted them
    assert paged_in > size // 2
    assert floor == pytest.approx(rss - size, abs=8 * 2**20)  # type: ignore[operator]


def test_json_the_tool_writes_is_strict(tmp_path: Path) -> None:
    """metrics.json, manifests, pipeline.json and bench JSON go through one writer: a NaN or
    inf (a diverged loss) is written as null, never as the bare NaN strict readers refuse."""
    import json

    path = tmp_path / "m.json"
    artifact.write_json(path, {"loss": float("nan"), "x": [1.0, float("inf")], "n": 3})

    def refuse(token: str) -> None:
        raise ValueError(token)

    assert json.loads(path.read_text(), parse_constant=refuse) == {
        "loss": None,
        "x": [1.0, None],
        "n": 3,
    }
