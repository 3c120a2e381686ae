"""The exact memory mode: recompute instead of save gives the same gradients and updates."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import wasi_tool.nn.subspace as subspace
from wasi_tool.measure import SavedBytesMeter
from wasi_tool.methods import SubspaceSGD, finalize_
from wasi_tool.nn.recompute import recomputed
from wasi_tool.training.config import FinetuneConfig
from wasi_tool.training.loop import train_step
from wasi_tool.training.prepare import prepare_for_training

RANKS = [8, 3, 16]


def _prepared(model: nn.Module, method: str, mode: str) -> tuple[nn.Module, list[str]]:
    model = copy.deepcopy(model)
    options = {"keep_rate": 0.75} if method.startswith("bsr") else {}
    cfg = FinetuneConfig.from_flat(
        method=method, act_ranks=RANKS, memory_mode=mode, targets="mlp", eps=0.9, **options
    )
    prepared = prepare_for_training(model, cfg, lambda t: ({n: tuple(RANKS) for n in t}, None))
    return model.train(), prepared.targets


def _with_dropout(model: nn.Module) -> nn.Module:
    for block in model.blocks:  # type: ignore[union-attr]
        block.attn.attn_drop.p = 0.1
        block.mlp.drop1.p = 0.1
    return model


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vanilla", "wasi", "bsr+wasi"])
def test_recompute_gives_the_same_gradients_and_updates(
    method: str, tiny_model: Callable[..., nn.Module], images: Callable[..., torch.Tensor]
) -> None:
    base = _with_dropout(tiny_model())
    x, y = images(8), torch.arange(8) % 10
    plain, _ = _prepared(base, method, "off")
    recomp, _ = _prepared(base, method, "block")
    assert len(recomputed(recomp)) == 12 and not recomputed(plain)
    opts = [SubspaceSGD(m, lr=0.05, clip=2.0) for m in (plain, recomp)]
    for _ in range(2):
        grads = []
        for model, opt in zip((plain, recomp), opts, strict=True):
            torch.manual_seed(5)  # the same dropout masks in both runs
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            grads.append(
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
                | {
                    f"{n}.P": m.pending_grad.clone()
                    for n, m in model.named_modules()
                    if isinstance(m, subspace.WASILinear) and m.pending_grad is not None
                }
            )
            opt.step()
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for key in grads[0]:
            torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-6, rtol=1e-5)
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), recomp.state_dict().items(), strict=True
    ):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
    finalize_(recomp)
    assert not recomputed(recomp)


def test_asi_bases_advance_once_per_step_under_recompute(
    tiny_model: Callable[..., nn.Module],
    images: Callable[..., torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[Any] = []
    real = subspace.tucker_compress

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(subspace, "tucker_compress", counting)
    model, targets = _prepared(tiny_model(), "wasi", "block")
    opt = SubspaceSGD(model, lr=0.05)
    x, y = images(16), torch.arange(16) % 10
    for step in range(1, 3):
        train_step(model, opt, x, y)
        assert len(calls) == step * len(targets)  # one compression per layer per step
    layers = [m for m in model.modules() if isinstance(m, subspace.WASILinear)]
    assert all(m.act is not None and not m.act._records for m in layers)  # all replayed


def test_recompute_keeps_only_block_inputs(
    tiny_model: Callable[..., nn.Module], images: Callable[..., torch.Tensor]
) -> None:
    x, y = images(16), torch.arange(16) % 10
    saved = {}
    for mode in ("off", "block"):
        model, targets = _prepared(tiny_model(), "wasi", mode)
        meter = SavedBytesMeter(model, targets)
        train_step(model, SubspaceSGD(model, lr=0.05), x, y, meter=meter)
        saved[mode] = meter.total
    # 12 block inputs of (16, 5, 192) fp32 plus the recorded compressions and what sits
    # outside the blocks (patch embedding, final norm, head)
    assert saved["block"] < saved["off"] / 4
    assert saved["block"] >= 12 * 16 * 5 * 192 * 4
