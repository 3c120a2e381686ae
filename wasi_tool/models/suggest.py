"""'Did you mean' for a mistyped name: candidates ranked by edit distance, where a name may
also match the start of a longer one (``vit_tinyy`` -> ``vit_tiny_patch16_224``)."""

from __future__ import annotations

from collections.abc import Iterable


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for ca, cb in zip(a, b, strict=False):
        if ca != cb:
            break
        n += 1
    return n


def suggest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` candidates closest to ``name`` by the smaller of the edit distance to the
    whole candidate and to its first ``len(name)`` characters (a typed prefix of a long name):
    at most a quarter of the name's length (at least 1) and at most one more than the best.
    Ties go to the longer common prefix, then the shorter name, then alphabetical order."""
    name = name.strip().lower()
    limit = max(1, len(name) // 4)
    scored = []
    for cand in set(candidates):
        low = cand.lower()
        d = min(edit_distance(name, low), edit_distance(name, low[: len(name)]) + 1)
        if low.startswith(name):
            d = min(d, 1)
        if d <= limit:
            scored.append((d, -_common_prefix(name, low), len(cand), cand))
    if not scored:
        return []
    best = min(scored)[0]
    return [c for d, *_, c in sorted(scored)[:n] if d <= best + 1]
