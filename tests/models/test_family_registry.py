"""Adding a model family is one class plus one registration: a toy family, defined here and not
in the product (a tiny MLP-mixer whose blocks are ``trunk.cell<i>``, no numbered module lists),
loads by name, fine-tunes end to end through the finetune stage (wasi on ``mlp@last1``), saves
an artifact that rebuilds through the family, and answers blocks, ``block_of`` and presets."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.models import ModelSource, load_model, select_targets
from wasi_tool.models.families import (
    InputSpec,
    ModelFamily,
    families,
    family_for_arch,
    family_of,
    register_family,
    unregister_family,
)
from wasi_tool.models.families.base import TokenDropAnswer
from wasi_tool.stages import FinetuneConfig, run_finetune

ARCH = "toy-mixer"


class Cell(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class ToyMixer(nn.Module):
    """Patches -> ``trunk.cell0..`` -> mean -> head; ``probe.mlp.fc1`` is named like timm's
    MLP but is no block's (the toy's ``mlp`` preset must not pick it)."""

    def __init__(self, num_classes: int = 3, img_size: int = 8, depth: int = 2) -> None:
        super().__init__()
        dim, self.img_size, self.num_classes = 16, img_size, num_classes
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.trunk = nn.Module()
        for i in range(depth):
            self.trunk.add_module(f"cell{i}", Cell(dim))
        self.probe = nn.Module()
        self.probe.mlp = nn.Module()
        self.probe.mlp.fc1 = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        for cell in self.trunk.children():
            x = cell(x)
        return self.head(self.probe.mlp.fc1(x).mean(dim=1))


class ToyFamily(ModelFamily):
    name = "toy"
    block_layout = "`trunk.cell<i>` (the toy mixer)"
    presets: ClassVar[Mapping[str, tuple[str, ...]]] = {"mlp": ("*.up", "*.down")}
    final_norms = ()
    _CELL = re.compile(r"^(trunk\.cell\d+)(\.|$)")

    def owns_arch(self, arch: str) -> bool:
        return arch == ARCH

    def arch_names(self) -> list[str]:
        return [ARCH]

    def build(self, arch: str, **kwargs: Any) -> nn.Module:
        given = {k: v for k, v in kwargs.items() if v is not None}
        return ToyMixer(**given).eval()

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, ToyMixer)

    def blocks(self, model: nn.Module) -> list[str]:
        return [f"trunk.{name}" for name, _ in model.get_submodule("trunk").named_children()]

    def block_of(self, name: str) -> str | None:
        found = self._CELL.match(name)
        return found.group(1) if found else None

    def input_spec(self, model: nn.Module, model_kwargs: Mapping[str, Any]) -> InputSpec:
        return InputSpec("images", int(model_kwargs.get("img_size") or 8))

    def token_drop_block(self, model: nn.Module, block: nn.Module) -> TokenDropAnswer:
        return "the toy's cells have no CLS token"


@pytest.fixture
def toy() -> Iterator[ModelFamily]:
    before = families()
    family = register_family(ToyFamily())
    yield family
    unregister_family(family.name)
    assert families() == before


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    src = ModelSource(arch=ARCH, random_init=True, num_classes=3, img_size=8)
    return load_model(src).model


def test_the_toy_answers_for_its_models(toy: ModelFamily) -> None:
    model = _toy_model()
    assert family_of(model) is toy and family_for_arch(ARCH) is toy
    assert toy.blocks(model) == ["trunk.cell0", "trunk.cell1"]
    assert (
        toy.block_of("trunk.cell1.down") == "trunk.cell1" and toy.block_of("probe.mlp.fc1") is None
    )
    # its own presets only: timm's "*mlp.fc1" is not tried on a toy model
    assert select_targets(model, "mlp") == [
        "trunk.cell0.up", "trunk.cell0.down", "trunk.cell1.up", "trunk.cell1.down"
    ]  # fmt: skip
    assert select_targets(model, "mlp@last1") == ["trunk.cell1.up", "trunk.cell1.down"]
    assert "head" not in select_targets(model, "all")
    from wasi_tool.methods import bsr

    plan = bsr.plan_bsr(model, trained=[1])
    assert plan.trained_names == ["trunk.cell1"] and "no CLS token" in plan.notes[0]


def test_unregistering_restores_the_registry(toy: ModelFamily) -> None:
    model = _toy_model()
    unregister_family(toy.name)
    try:
        # a module no family claims: the plain fallback, every family's presets
        assert family_of(model).name == "plain"
        assert select_targets(model, "mlp") == ["probe.mlp.fc1"]
        with pytest.raises(WasiToolError, match="unknown architecture 'toy-mixer'"):
            load_model(ModelSource(arch=ARCH, random_init=True))
    finally:
        register_family(toy)


def test_registry_rejects_duplicates_and_unknown_places(toy: ModelFamily) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_family(ToyFamily())
    with pytest.raises(ValueError, match="no model family 'nope'"):
        register_family(type("Other", (ToyFamily,), {"name": "other"})(), before="nope")
    unregister_family(toy.name)
    register_family(toy, before="timm")  # asked before timm; the fixture removes it again
    names = [f.name for f in families()]
    assert names.index("toy") == names.index("timm") - 1 and names[-1] == "plain"


@pytest.mark.slow
def test_a_registered_toy_family_fine_tunes_end_to_end(toy: ModelFamily, tmp_path: Path) -> None:
    src = ModelSource(arch=ARCH, random_init=True, num_classes=10, img_size=8, seed=3)
    torch.manual_seed(3)
    before = load_model(src).model.state_dict()
    cfg = FinetuneConfig(
        method="wasi", epochs=1, batch_size=32, max_steps=2, targets="mlp@last1", eps=0.9
    )
    result = run_finetune(src, "digits", cfg, tmp_path / "toy")
    assert result.metrics.targets == ["trunk.cell1.up", "trunk.cell1.down"]
    again = load_model(ModelSource(checkpoint=tmp_path / "toy"))  # rebuilt by the toy family
    assert isinstance(again.model, ToyMixer) and again.arch == ARCH
    after = again.model.state_dict()
    assert not torch.equal(after["head.weight"], before["head.weight"])  # it trained
    x = torch.randn(2, 3, 8, 8)
    assert again.model(x).shape == (2, 10)


def test_each_family_answers_its_own_presets_and_blocks(tiny_model: Any) -> None:
    vit = tiny_model()
    timm = family_of(vit)
    assert timm.name == "timm" and timm.preset("mlp") == timm.presets["mlp"]
    assert timm.preset("all") == ("*",) and timm.preset("blocks.0.*") is None
    assert timm.block_of("blocks.3.mlp.fc1") == "blocks.3"
    names = {f.name: f for f in families()}
    assert names["torchvision"].block_of("encoder.layers.encoder_layer_3.mlp.0") == (
        "encoder.layers.encoder_layer_3"
    )
    assert names["hf"].block_of("bert.encoder.layer.3.output.dense") == "bert.encoder.layer.3"
    assert names["hf"].block_of("classifier") is None
    # a module no family claims tries every family's names
    plain = family_of(nn.Sequential(nn.Linear(2, 2)))
    mlp = plain.preset("mlp") or ()
    assert plain.name == "plain" and {"*linear1", "*mlp.fc1", "*intermediate.dense"} <= set(mlp)
