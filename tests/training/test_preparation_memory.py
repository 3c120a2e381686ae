"""What sits under every run (issue 34): the preparation holds no second copy of the weights,
and a run that loads a timm checkpoint and probes its memory does not import torch._dynamo.

Memory is counted in live-tensor bytes (unique storages of every tensor the garbage collector
reaches, gradients included), never in time.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from torch import nn

from tests.child import run_child
from wasi_tool.nn.factored import FactoredLinear
from wasi_tool.nn.subspace import WASILinear

WIDTH, DEPTH = 256, 6


def _live_bytes() -> int:
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            try:
                storage = obj.untyped_storage()
                pointer = storage.data_ptr()
            except RuntimeError:  # a fake tensor an earlier test's export left: no storage
                continue
            if pointer:
                seen[pointer] = storage.nbytes()
    return sum(seen.values())


def test_a_wasi_layer_takes_the_factored_layers_tensors() -> None:
    """No second copy of the factors: a checkpoint's are pages of its memory map, resident
    while any weight of the file lives, so a copy left them resident beside it (0.1 GB of
    ViT-B/32's floor)."""
    fact = FactoredLinear.from_linear(nn.Linear(32, 16), 4)
    layer = WASILinear.from_factored(fact, (2, 2, 2))
    for name in ("L", "R", "bias"):
        mine, theirs = getattr(layer, name), getattr(fact, name)
        assert mine.data_ptr() == theirs.data_ptr(), name
        assert isinstance(mine, nn.Parameter) and mine.requires_grad


def test_the_preparation_holds_one_layers_dense_and_factored_copies_at_most(
    monkeypatch: object,
) -> None:
    """Factoring and swapping every dense target of a small model: after each layer is
    replaced, the live tensors are at most the dense model's plus one layer's factored copy
    (a dense weight the preparation kept, or factors made for all layers before swapping
    them in, would exceed it by several layers' worth)."""
    from wasi_tool.methods import base as methods_base
    from wasi_tool.training.config import FinetuneConfig
    from wasi_tool.training.prepare import prepare_for_training
    from wasi_tool.transforms import compress

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH)) for _ in range(DEPTH)])
    names = [f"{k}.0" for k in range(DEPTH)]
    dense_layer = WIDTH * WIDTH * 4 + WIDTH * 4
    readings: list[int] = []
    for module in (compress, methods_base):
        original = module.set_submodule  # type: ignore[attr-defined]

        def swap(model: nn.Module, name: str, new: nn.Module, original=original) -> None:
            original(model, name, new)
            readings.append(_live_bytes())

        monkeypatch.setattr(module, "set_submodule", swap)  # type: ignore[attr-defined]
    before = _live_bytes()
    config = FinetuneConfig(method="wasi", targets=",".join(names), eps=0.5)
    prepared = prepare_for_training(model, config, lambda t: ({n: (1, 2, 8) for n in t}, None))
    assert prepared.targets == names
    assert len(readings) == 2 * DEPTH  # factored, then swapped for WASI layers
    rank = model[0][0].rank
    assert rank < WIDTH // 2  # the factors are smaller than the dense weight
    one_factored = (2 * rank * WIDTH + WIDTH) * 4
    assert max(readings) <= before + one_factored
    # the dense weights are gone and the WASI layers hold the factors (no copy of them)
    factored_all = DEPTH * one_factored
    assert readings[-1] <= before - DEPTH * dense_layer + factored_all + one_factored


def test_a_checkpoint_run_and_its_memory_probe_do_not_import_dynamo(tmp_path: Path) -> None:
    """A fresh interpreter loads a factored timm artifact (built on the meta device, its
    init skipped) and runs a memory probe (the live-tensor meter): torch._dynamo (0.16 GB
    resident, 0.08 GB anonymous) stays out. The check can fail: importing torchvision.ops
    without import_timm's stand-in brings it in."""
    from wasi_tool.models.loading import ModelSource
    from wasi_tool.stages import CompressConfig, run_compress

    src = ModelSource(arch="vit_tiny_patch16_224", img_size=32, random_init=True, num_classes=4)
    out = run_compress(src, CompressConfig(targets="mlp", rank_ratio=0.25), tmp_path / "m").out
    code = (
        "import json, sys, torch\n"
        "from wasi_tool.allocator import release_free_memory\n"
        "from wasi_tool.measure import LiveTensorMeter\n"
        "from wasi_tool.models.loading import ModelSource, load_model\n"
        f"model = load_model(ModelSource(checkpoint={str(out)!r})).model.train()\n"
        "with LiveTensorMeter() as live:\n"
        "    model(torch.rand(2, 3, 32, 32)).sum().backward()\n"
        "release_free_memory()\n"
        "after_run = 'torch._dynamo' in sys.modules\n"
        "import torchvision.ops\n"
        "print(json.dumps([after_run, 'torch._dynamo' in sys.modules, live.peak > 0]))\n"
    )
    after_run, after_torchvision_ops, metered = _child(code)
    assert metered
    assert not after_run
    # timm imported torchvision.ops with the stand-in; a second import is cached and lazy still
    assert not after_torchvision_ops
    # the control: torchvision.ops imported plainly brings torch._dynamo in
    assert _child(
        "import json, sys, torchvision.ops\nprint(json.dumps('torch._dynamo' in sys.modules))"
    )


def test_loading_a_factored_artifact_imports_no_sympy(tmp_path: Path) -> None:
    """The factored layers of an artifact are built on the meta device directly, not by
    skip_init, whose meta-device empty_like runs a Python reference that imports torch.fx's
    symbolic shapes and sympy (484 modules, 0.04 GB resident at ViT-B/32's load). The control
    shows the check can fail."""
    from wasi_tool.models.loading import ModelSource
    from wasi_tool.stages import CompressConfig, run_compress

    src = ModelSource(arch="vit_tiny_patch16_224", img_size=32, random_init=True, num_classes=4)
    out = run_compress(src, CompressConfig(targets="mlp", rank_ratio=0.25), tmp_path / "m").out
    code = (
        "import json, sys\n"
        "from wasi_tool.models.loading import ModelSource, load_model\n"
        f"load_model(ModelSource(checkpoint={str(out)!r}))\n"
        "print(json.dumps('sympy' in sys.modules))\n"
    )
    assert _child(code) is False
    control = (
        "import json, sys, torch\n"
        "from wasi_tool.nn import FactoredLinear\n"
        "torch.nn.utils.skip_init(FactoredLinear, 8, 16, 4, device='meta')\n"
        "print(json.dumps('sympy' in sys.modules))\n"
    )
    assert _child(control) is True


def _child(code: str) -> object:
    return run_child(code)
