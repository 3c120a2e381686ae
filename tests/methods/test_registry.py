"""Adding a method is one class plus one registration: a toy method, defined here and not in
the product, trains end to end through the finetune stage, the CLI's config and finalize_."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.methods import (
    METHODS,
    LayerOptions,
    Method,
    get_method,
    register_method,
    unregister_method,
)
from wasi_tool.methods.base import dense
from wasi_tool.models import ModelSource, load_model
from wasi_tool.stages import FinetuneConfig, run_finetune


class FrozenTargets(Method):
    """Toy: the targets stay dense and frozen; everything else trains as usual."""

    name = "toy-frozen-targets"
    description = "dense targets, frozen (a test-only method)"

    def build_layer(self, layer: nn.Module, options: LayerOptions) -> nn.Module:
        linear = dense(layer)
        linear.requires_grad_(False)
        return linear


@pytest.fixture
def toy() -> Iterator[Method]:
    method = register_method(FrozenTargets)
    yield method
    unregister_method(method.name)


@pytest.mark.slow
def test_a_registered_toy_method_trains_end_to_end(
    toy: Method, tmp_path: Path, tiny_spec: dict[str, object]
) -> None:
    assert get_method("toy-frozen-targets") is toy and "toy-frozen-targets" in METHODS
    src = ModelSource(random_init=True, arch=str(tiny_spec["arch"]), img_size=32, seed=3)
    before = load_model(src).model.state_dict()
    cfg = FinetuneConfig(method=toy.name, epochs=1, batch_size=32, max_steps=2, targets="mlp")
    result = run_finetune(src, "digits", cfg, tmp_path / "toy")
    after = load_model(ModelSource(checkpoint=tmp_path / "toy")).model.state_dict()
    assert result.metrics.method == toy.name and len(result.metrics.targets) == 24
    for name in result.metrics.targets:  # the targets did not move ...
        torch.testing.assert_close(after[f"{name}.weight"], before[f"{name}.weight"])
    # ... the rest trained
    assert not torch.equal(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])


def test_registry_rejects_duplicates_and_unknown_names(toy: Method) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_method(FrozenTargets)
    with pytest.raises(WasiToolError, match="unknown method 'nope'"):
        get_method("nope")
    unregister_method(toy.name)
    with pytest.raises(WasiToolError, match="unknown method"):
        FinetuneConfig(method=toy.name)
    register_method(toy)  # the fixture unregisters it again
