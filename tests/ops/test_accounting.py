import pytest

from wasi_tool.ops.accounting import (
    layer_memory_elements,
    layer_step_flops,
    reference_code_flops,
    tucker_elements,
)

MIB = 1024 * 1024


def test_vit_b32_vanilla_memory_matches_the_paper() -> None:
    """method.md section 5: all 72 linears of ViT-B/32 (q, k, v, proj, fc1, fc2 per block)."""
    shape = (128, 50)
    layers = [(768, 768)] * 4 + [(768, 3072), (3072, 768)]  # (in, out)
    act = weight = 0
    for i, o in layers * 12:
        mem = layer_memory_elements((*shape, i), o, i)
        act += mem["activation"]
        weight += mem["weight"]
    assert act * 4 / MIB == pytest.approx(2025.0)
    assert weight * 4 / MIB == pytest.approx(324.0)


def test_wasi_memory_formula() -> None:
    mem = layer_memory_elements(
        (64, 50, 768), 3072, 768, factored=True, compressed=True, rank=192, act_ranks=(16, 12, 32)
    )
    assert mem["activation"] == 16 * 12 * 32 + 64 * 16 + 50 * 12 + 768 * 32
    assert mem["activation"] == tucker_elements((64, 50, 768), (16, 12, 32))
    assert mem["weight"] == 192 * (3072 + 768)
    with pytest.raises(ValueError):
        layer_memory_elements((64, 50, 768), 3072, 768, factored=True, compressed=True, rank=192)


def test_flops() -> None:
    vanilla = layer_step_flops((64, 50, 768), 3072, 768)
    assert vanilla["total"] == 3 * 2 * 64 * 50 * 768 * 3072
    wasi = layer_step_flops(
        (64, 50, 768), 3072, 768, factored=True, compressed=True, rank=192, act_ranks=(16, 12, 32)
    )
    assert wasi["forward"] == 2 * 3200 * 192 * (768 + 3072)
    assert 0 < wasi["compress"] < wasi["forward"]
    assert vanilla["total"] / wasi["total"] > 3
    ref = reference_code_flops(
        (64, 50, 768), 3072, 768, factored=True, compressed=True, rank=192, act_ranks=(16, 12, 32)
    )
    assert ref["total"] != wasi["total"]  # a different convention, kept only for comparison
    assert reference_code_flops((64, 50, 768), 3072, 768)["forward"] == 3200 * 3072 * 1535
