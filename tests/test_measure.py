"""The process measurements: the library floor counts weights that are really resident."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from wasi_tool import artifacts
from wasi_tool.measure import file_backed_bytes, library_floor, rss_bytes

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")


def test_floor_pages_in_memory_mapped_weights(tmp_path: Path) -> None:
    """Weights given to a model from safetensors' memory map (as the loader does, with
    ``assign``) are not resident until read. The floor subtracts them, so it must read them
    first: afterwards, reading every weight adds (almost) nothing to the resident size."""
    size = 64 * 2**20  # 64 MiB of weights
    path = tmp_path / "w.safetensors"
    save_file({"weight": torch.randn(size // 4 // 1024, 1024)}, str(path))
    tensors, _ = artifacts.load_weights(path)
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
