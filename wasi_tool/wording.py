"""One wording rule for every ratio the tool prints (report, CLI tables, bench output).

A ratio is always ``baseline / new`` for a figure where less is better (time, bytes, memory):
above 1 the new one is better ("2.31x fewer", "1.08x faster"), below 1 it is worse and the
inverse is given with the opposite word ("1.08x more", "1.08x slower"), and inside the noise
band (default 3 %) it says "same". So "0.93x less" (which meant more) is never printed.
"""

from __future__ import annotations

import math

NOISE = 0.03  # ratios within 3 % of 1 read "same"

# (better, worse) words per kind of figure
WORDS = {
    "bytes": ("fewer", "more"),
    "memory": ("less", "more"),
    "time": ("faster", "slower"),
    "size": ("smaller", "larger"),
}


def ratio(r: float | None, kind: str = "bytes", noise: float = NOISE) -> str:
    """``r = baseline / new`` in words: "9.10x fewer", "1.08x more", "same", "" when unknown.

    ``kind`` picks the words (``WORDS``); ``noise`` is the relative band read as "same".
    Two decimals below 10x, one above.
    """
    if r is None or not math.isfinite(r) or r <= 0:
        return ""
    better, worse = WORDS[kind]
    if abs(math.log(r)) <= math.log1p(noise):
        return "same"
    x, word = (r, better) if r > 1 else (1 / r, worse)
    return f"{x:.1f}x {word}" if x >= 10 else f"{x:.2f}x {word}"


def spread(median: float, low: float, high: float, unit: str = "ms", scale: float = 1e3) -> str:
    """A median with its spread: "12.3 ms (p10-p90 11.9-14.0)"."""
    return f"{median * scale:.1f} {unit} (p10-p90 {low * scale:.1f}-{high * scale:.1f})"


WIDE = 0.25  # a spread wider than 25 % of the median is worth a warning


def wide(median: float, low: float, high: float, limit: float = WIDE) -> bool:
    """Whether the p10-p90 spread is wide next to the median (the machine was busy)."""
    return median > 0 and (high - low) / median > limit
