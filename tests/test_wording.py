"""The one ratio wording rule (wasi_tool/wording.py) and where it is printed."""

from __future__ import annotations

import pytest

from wasi_tool.measure import pace
from wasi_tool.wording import ratio, wide


@pytest.mark.parametrize(
    ("r", "kind", "expected"),
    [
        (39.04, "bytes", "39.0x fewer"),
        (9.1, "bytes", "9.10x fewer"),
        (1 / 1.08, "bytes", "1.08x more"),
        (1 / 0.93, "memory", "1.08x less"),
        (0.93, "memory", "1.08x more"),
        (1.0, "memory", "same"),
        (1.02, "time", "same"),
        (0.98, "time", "same"),
        (1.66, "time", "1.66x faster"),
        (0.5, "time", "2.00x slower"),
        (2.0, "size", "2.00x smaller"),
        (0.25, "size", "4.00x larger"),
        (None, "bytes", ""),
        (float("nan"), "bytes", ""),
        (0.0, "bytes", ""),
    ],
)
def test_ratio_words(r: float | None, kind: str, expected: str) -> None:
    assert ratio(r, kind) == expected


def test_never_a_ratio_below_one_with_a_better_word() -> None:
    for r in (0.5, 0.8, 0.9, 0.95, 0.96):
        for kind in ("bytes", "memory", "time", "size"):
            text = ratio(r, kind)
            assert text == "same" or not text.startswith("0."), text
            assert not any(w in text for w in ("fewer", "less", "faster", "smaller")), text


def test_pace_uses_the_rule() -> None:
    assert pace(1.0) == "same"
    assert pace(1 / 1.47) == "1.47x slower"


def test_wide_spread() -> None:
    assert wide(1.0, 0.5, 5.5)
    assert not wide(1.0, 0.95, 1.1)
