"""'Did you mean': edit distance with a typed prefix of a long name, not difflib's ratio (which
answered vit_tinyy with gcvit_tiny, davit_tiny, mvitv2_tiny)."""

from __future__ import annotations

import pytest

from wasi_tool.errors import WasiToolError
from wasi_tool.models.registry import check_arch
from wasi_tool.models.suggest import edit_distance, suggest


def test_edit_distance() -> None:
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert edit_distance("vit_tinyy", "vit_tiny_") == 1


def test_ranked_by_distance_then_prefix() -> None:
    names = ["gcvit_tiny", "davit_tiny", "mvitv2_tiny", "vit_tiny_patch16_224", "vit_small"]
    assert suggest("vit_tinyy", names) == ["vit_tiny_patch16_224"]
    assert suggest("VIT_SMAL", names) == ["vit_small"]
    assert suggest("xyzzy", names) == []


def test_timm_arch_typo_names_the_right_model() -> None:
    with pytest.raises(WasiToolError, match=r"did you mean vit_tiny_patch16_224, ") as err:
        check_arch("vit_tinyy")
    assert "gcvit" not in str(err.value)
    with pytest.raises(WasiToolError, match=r"did you mean torchvision:vit_b_16"):
        check_arch("torchvision:vit_b_61")
