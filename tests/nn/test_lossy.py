"""Lossy storage (off by default): norm and GELU inputs kept in bfloat16 for backward."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.measure import SavedBytesMeter
from wasi_tool.methods import finalize_
from wasi_tool.nn.lossy import lossy_modules, stored_lossily
from wasi_tool.training.config import FinetuneConfig
from wasi_tool.training.prepare import prepare_for_training

RANKS = (8, 3, 16)


def _prepared(model: nn.Module, method: str, mode: str, lossy: str) -> nn.Module:
    model = copy.deepcopy(model)
    cfg = FinetuneConfig(
        method=method, act_ranks=list(RANKS), memory_mode=mode, lossy=lossy, targets="mlp"
    )
    prepare_for_training(model, cfg, lambda t: ({n: RANKS for n in t}, None))
    return model.train()


def _step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[int, dict[str, torch.Tensor]]:
    meter = SavedBytesMeter(model)
    with meter:
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    meter.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return meter.total, grads


@pytest.mark.parametrize("method", ["vanilla", "wasi"])
def test_bf16_halves_the_norm_and_gelu_inputs_and_keeps_gradients_close(
    method: str, tiny_model: Callable[..., nn.Module], images: Callable[..., torch.Tensor]
) -> None:
    base = tiny_model()
    x, y = images(8), torch.arange(8) % 10
    exact = _prepared(base, method, "off", "off")
    lossy = _prepared(base, method, "off", "bf16")
    names = stored_lossily(lossy)
    assert not stored_lossily(exact)
    # every block's norm1, norm2 and GELU
    assert len(names) == 3 * len(base.blocks)  # type: ignore[arg-type]
    inputs: dict[str, int] = {}
    hooks = [
        lossy.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: inputs.__setitem__(n, a[0].numel())
        )
        for n in names
    ]
    torch.manual_seed(0)
    saved_exact, g_exact = _step(exact, x, y)
    torch.manual_seed(0)
    saved_lossy, g_lossy = _step(lossy, x, y)
    for h in hooks:
        h.remove()
    # each of those inputs went from 4 to 2 bytes per element, nothing else changed
    assert saved_exact - saved_lossy == 2 * sum(inputs.values())
    assert g_exact.keys() == g_lossy.keys()
    differs = False
    for n, g in g_exact.items():
        torch.testing.assert_close(g_lossy[n], g, rtol=0.05, atol=2e-3 * float(g.abs().max()))
        differs |= not torch.equal(g_lossy[n], g)
    assert differs  # the rounding is really there
    with torch.no_grad():  # the forward is untouched
        torch.testing.assert_close(lossy.eval()(x), exact.eval()(x))
    finalize_(lossy, method)
    assert not stored_lossily(lossy)


def test_modules_inside_recompute_regions_are_left_exact(
    tiny_model: Callable[..., nn.Module],
) -> None:
    model = _prepared(tiny_model(), "wasi", "mlp", "bf16")
    names = stored_lossily(model)
    assert names and all(n.endswith(("norm1", "norm2")) for n in names)
    assert lossy_modules(model, ["blocks.0"]) == ["blocks.0.norm1", "blocks.0.norm2"]


def test_lossy_settings_are_checked() -> None:
    with pytest.raises(WasiToolError, match="lossy must be one of"):
        FinetuneConfig(lossy="int4")
    with pytest.raises(WasiToolError, match="recomputed block stores nothing"):
        FinetuneConfig(lossy="bf16", memory_mode="block")
    assert FinetuneConfig().lossy == "off"
