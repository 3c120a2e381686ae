"""The recompute region (wasi_tool/nn/recompute.py): saved-tensor hooks that keep only the
region's inputs and replay its forward in backward, without torch.utils.checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.child import run_child
from wasi_tool.errors import WasiToolError
from wasi_tool.nn.recompute import recompute_, run_recomputed


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.3), nn.LayerNorm(16), nn.Linear(16, 4)
    ).double()


def test_gradients_equal_the_saved_forward_with_dropout() -> None:
    """Dropout draws the same mask in the replay (the RNG state is restored)."""
    plain = _mlp()
    region = recompute_(copy.deepcopy(plain))
    x = torch.randn(5, 8, dtype=torch.double, requires_grad=True)
    grads = []
    for model in (plain, region):
        x.grad = None
        torch.manual_seed(1)
        out = model(x)
        out.pow(2).sum().backward()
        grads.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in model.parameters()]))
    (o1, gx1, gp1), (o2, gx2, gp2) = grads
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(gx2, gx1)
    for a, b in zip(gp2, gp1, strict=True):
        torch.testing.assert_close(a, b)


def test_gradcheck_and_a_second_backward_through_the_same_graph() -> None:
    model = recompute_(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double())
    x = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(model, (x,))
    loss = model(x).pow(2).sum()
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()  # every saved tensor is unpacked again: the region replays again
    torch.testing.assert_close(x.grad, 2 * first)


def test_only_the_inputs_are_saved_and_the_replay_is_released() -> None:
    """What autograd holds for the region: its input, no tensor of its ops."""
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    x = torch.randn(32, 64, requires_grad=True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    exact = sum(saved)
    saved.clear()
    recompute_(model)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x).sum()
    assert exact > 32 * 256 * 4 and saved == []  # the region's own hooks shadow the meter
    out.backward()
    assert x.grad is not None


def test_an_argument_given_twice_is_one_tensor_in_the_replay() -> None:
    """Self-attention called as attn(x, x, x) checks query is key: the replay keeps that."""
    seen: list[bool] = []

    def attn(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        seen.append(q is k)
        return (q * k).tanh()

    x = torch.randn(4, requires_grad=True)
    run_recomputed(attn, x, x).sum().backward()
    assert seen == [True, True]


def test_a_replay_that_saves_other_tensors_is_refused() -> None:
    calls = []

    def changing(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x.exp() if len(calls) == 1 else x.exp().exp()

    x = torch.randn(3, requires_grad=True)
    out = run_recomputed(changing, x)
    with pytest.raises(WasiToolError, match="its forward must do the same work"):
        out.sum().backward()


def test_a_recompute_step_imports_no_dynamo() -> None:
    """torch.utils.checkpoint imports torch._dynamo (0.16 GB resident) at its first call; the
    region does not. The check can fail: the child then calls torch's checkpoint."""
    code = (
        "import json, sys, torch\n"
        "from torch import nn\n"
        "from wasi_tool.nn.recompute import recompute_\n"
        "layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)\n"
        "recompute_(layer).train()\n"
        "layer(torch.randn(2, 5, 16, requires_grad=True)).sum().backward()\n"
        "ours = 'torch._dynamo' in sys.modules\n"
        "import torch.utils.checkpoint as c\n"
        "c.checkpoint(nn.Linear(3, 3), torch.randn(2, 3, requires_grad=True), "
        "use_reentrant=False).sum().backward()\n"
        "print(json.dumps([ours, 'torch._dynamo' in sys.modules]))\n"
    )
    ours, torchs = run_child(code)
    assert not ours
    assert torchs  # the control
