"""LoRA-FA (A frozen, only x A^T saved) and memory-exact LoRA (x A^T recomputed in backward).

LoRA-FA's A never moves and its saved bytes are the formula T r per target; memory-exact
LoRA's gradients equal plain LoRA's with fewer saved bytes (T C per target instead of
T (C + r)), measured with saved_tensors_hooks; both train through finetune (merged on save),
the bench and prepare.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import wasi_tool
from wasi_tool.errors import WasiToolError
from wasi_tool.measure import SavedBytesMeter
from wasi_tool.methods import get_method
from wasi_tool.training.accounting import layer_accounting

TARGETS = ["fc1", "fc2"]
B, N, C, H, R = 4, 5, 12, 16, 3  # batch, tokens, width, hidden, adapter rank


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(C, H), nn.GELU(), nn.Linear(H, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _prepared(method: str, **options: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Toy()
    return wasi_tool.prepare(model, method, TARGETS, lr=0.05, lora_rank=R, verbose=False, **options)


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, C, generator=gen), torch.randn(B, N, C, generator=gen)


def _nonzero_b(model: nn.Module) -> None:
    """B starts at 0, which makes dA = 0: give it values so every gradient is exercised."""
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _saved(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, dict[str, Any]]:
    """Bytes saved inside the targets by one forward whose input requires grad (as inside a
    network); the loss's backward gives each parameter's gradient."""
    meter = SavedBytesMeter(model, TARGETS)
    x = x.clone().requires_grad_(True)
    with meter:
        out = model(x)
    meter.remove()
    model.zero_grad()
    nn.functional.mse_loss(out, y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return meter.targets, grads


def _rows(model: nn.Module, method: str) -> list[int]:
    shapes = {"fc1": (B, N, C), "fc2": (B, N, H)}
    rows = layer_accounting(model, TARGETS, get_method(method), shapes, adapter_rank=R)
    return [r["memory_elements"]["activation"] for r in rows]


def test_lora_fa_keeps_a_and_saves_the_formula() -> None:
    model, opt = _prepared("lora-fa")
    _nonzero_b(model)
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    b_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    assert a_before and not any(
        p.requires_grad for n, p in model.named_parameters() if "lora_A" in n
    )
    for seed in range(3):
        saved, grads = _saved(model, *_batch(seed))
        opt.step()
    assert not any("lora_A" in n for n in grads)
    for name, p in model.named_parameters():
        if "lora_A" in name:
            torch.testing.assert_close(p, a_before[name], rtol=0, atol=0)
        if "lora_B" in name:
            assert not torch.equal(p, b_before[name])
    tokens = B * N
    assert saved == 4 * len(TARGETS) * tokens * R  # x A^T per target, fp32
    assert _rows(model, "lora-fa") == [tokens * R, tokens * R]
    plain, _ = _prepared("lora")
    plain_saved, _ = _saved(plain, *_batch(0))
    assert plain_saved == 4 * tokens * ((C + R) + (H + R))  # x and x A^T per target
    assert _rows(plain, "lora") == [tokens * (C + R), tokens * (H + R)]


def test_memory_exact_lora_has_the_same_gradients_with_fewer_saved_bytes() -> None:
    plain, _ = _prepared("lora")
    exact, _ = _prepared("lora", lora_recompute=True)
    assert type(exact.get_submodule("fc1")).__name__ == "RecomputeLoraLinear"
    for model in (plain, exact):
        _nonzero_b(model)
    x, y = _batch(1)
    plain_saved, plain_grads = _saved(plain, x, y)
    exact_saved, exact_grads = _saved(exact, x, y)
    assert set(plain_grads) == set(exact_grads) and any("lora_A" in n for n in exact_grads)
    for name, g in plain_grads.items():
        torch.testing.assert_close(exact_grads[name], g, rtol=1e-5, atol=1e-7)
    tokens = B * N
    assert exact_saved == 4 * tokens * (C + H)  # the inputs only
    assert plain_saved - exact_saved == 4 * len(TARGETS) * tokens * R
    assert _rows(exact, "lora") == [tokens * C, tokens * H]
    xg = x.clone().requires_grad_(True)  # the input gradient through LowRankRecompute too
    xp = x.clone().requires_grad_(True)
    torch.testing.assert_close(
        torch.autograd.grad(exact(xg).sum(), xg)[0], torch.autograd.grad(plain(xp).sum(), xp)[0]
    )


def test_lora_fa_refuses_recompute() -> None:
    with pytest.raises(WasiToolError, match="lora_recompute is for lora"):
        _prepared("lora-fa", lora_recompute=True)


@pytest.mark.parametrize(("method", "recompute"), [("lora-fa", False), ("lora", True)])
def test_finetune_and_bench(method: str, recompute: bool, tmp_path: Path) -> None:
    from wasi_tool import artifact
    from wasi_tool.bench.train import TrainBenchConfig, measure
    from wasi_tool.models.loading import ModelSource
    from wasi_tool.stages.finetune import FinetuneConfig, run_finetune

    src = ModelSource(arch="vit_tiny_patch16_224", img_size=32, random_init=True, seed=0)
    cfg = FinetuneConfig.from_flat(
        method=method, targets="mlp", epochs=1, batch_size=8, max_steps=2, lora_rank=4,
        lora_recompute=recompute,
    )  # fmt: skip
    m = run_finetune(src, "digits", cfg, tmp_path / "ft").metrics
    assert m.final is not None and math.isfinite(m.final.train_loss)
    row = m.analytic["layers"][0]  # blocks.0.mlp.fc1: (8, 5, 192) -> 768
    tokens = 8 * 5
    expected = tokens * 4 if method == "lora-fa" else tokens * 192
    assert row["memory_elements"]["activation"] == expected
    weights = artifact.load_weights(tmp_path / "ft" / "model.safetensors")[0]
    assert not any("lora" in k for k in weights)  # merged on save
    bench = TrainBenchConfig.from_flat(
        arch="vit_tiny_patch16_224", img_size=32, random_init=True, method=method,
        targets="mlp", batch_size=4, steps=2, warmup=1, lora_rank=4, lora_recompute=recompute,
    )  # fmt: skip
    assert measure(bench).saved_bytes_targets > 0


@pytest.mark.parametrize("projection", [True, False])
def test_lora_fa_projects_b_gradient_as_the_lora_fa_optimiser(projection: bool) -> None:
    """One step, no clip or decay: B' = B - lr (r / alpha)^2 g_B (A A^T)^-1 (peft's LoRA-FA
    rule, checked against a dense float64 inverse), or plain SGD with the projection off."""
    model, opt = _prepared(
        "lora-fa", clip=None, weight_decay=0.0, lora_fa_projection=projection, lora_alpha=6.0
    )
    _nonzero_b(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, grads = _saved(model, *_batch(1))
    opt.step()
    checked = 0
    for name, p in model.named_parameters():
        if "lora_B" not in name:
            continue
        a = before[name.replace("lora_B", "lora_A")].to(torch.float64)
        g = grads[name].to(torch.float64)
        if projection:
            g = (R / 6.0) ** 2 * g @ torch.linalg.inv(a @ a.T)
        expected = before[name].to(torch.float64) - 0.05 * g
        torch.testing.assert_close(p.detach().to(torch.float64), expected, rtol=1e-5, atol=1e-7)
        checked += 1
    assert checked == len(TARGETS)
