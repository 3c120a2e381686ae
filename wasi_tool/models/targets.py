"""Choosing which linear layers a stage acts on."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.models.families import family_of
from wasi_tool.nn.factored import FactoredLinear

_LAST = re.compile(r"^(.*)@last(\d+)$")

LINEAR_TYPES = (nn.Linear, FactoredLinear)


def split_patterns(spec: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]`` (blank items dropped)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    return [p.strip() for item in items for p in item.split(",") if p.strip()]


# One target item: a preset or a glob over module names (letters, digits, _ . - and the glob
# characters * ? [ ] !), optionally @lastN. Anything else is refused where the value is read.
_ITEM = re.compile(r"[A-Za-z0-9_.*?\[\]!-]{1,200}(@last\d{1,4})?")


def check_patterns(spec: str | Sequence[str] | None, what: str) -> None:
    """Refuse a targets/exclude value that is not comma-separated module-name globs: it is
    checked when a config is built (the command line, a recipe, a --set), not when matched."""
    if spec is None:
        return
    if not isinstance(spec, str) and not (
        isinstance(spec, Sequence) and all(isinstance(s, str) for s in spec)
    ):
        raise WasiToolError(f"{what} takes comma-separated module-name globs, got {spec!r}")
    for item in split_patterns(spec):
        if not _ITEM.fullmatch(item):
            raise WasiToolError(
                f"{what} item {item[:60]!r} is not a module-name glob (letters, digits, "
                "_ . - * ? [ ] !, optionally @lastN)"
            )


def select_targets(model: nn.Module, targets: str, exclude: Sequence[str] = ()) -> list[str]:
    """Names of the linear layers matched by ``targets`` and not by ``exclude``, in model order.

    ``targets`` is a preset of the model's family (mlp, attn, all), or comma-separated globs
    over module names; an item may end in ``@lastN`` to keep only its matches in the model's
    last N blocks (the family's ``block_of``: ``layer.3``, ``layers.21``, ``blocks.11``), e.g.
    ``mlp@last2``. The classifier head is left out unless a pattern names it exactly.
    """
    check_patterns(targets, "targets")
    check_patterns(exclude, "exclude")
    family = family_of(model)
    linears = [name for name, mod in model.named_modules() if isinstance(mod, LINEAR_TYPES)]
    blocks = list(dict.fromkeys(b for b in map(family.block_of, linears) if b is not None))
    groups: list[tuple[tuple[str, ...], set[str] | None]] = []
    for item in split_patterns(targets):
        last = _LAST.match(item)
        allowed: set[str] | None = None
        if last is not None:
            item, count = last.group(1), int(last.group(2))
            if count < 1 or not blocks:
                raise WasiToolError(
                    f"targets {item}@last{count}: "
                    + ("N must be >= 1" if count < 1 else "this model has no numbered blocks")
                )
            allowed = set(blocks[-count:])
        groups.append((family.preset(item) or (item,), allowed))
    patterns = [p for group, _ in groups for p in group]
    if not patterns:
        raise WasiToolError("targets is empty")
    excludes = split_patterns(exclude)
    heads = family.heads(model)
    chosen = []
    for name in linears:
        is_head = name in heads or any(name.startswith(h + ".") for h in heads)
        matched = any(
            (name in group if is_head else any(fnmatch.fnmatchcase(name, p) for p in group))
            and (allowed is None or family.block_of(name) in allowed)
            for group, allowed in groups
        )
        if matched and not any(fnmatch.fnmatchcase(name, p) for p in excludes):
            chosen.append(name)
    if not chosen:
        sample = ", ".join(linears[:4]) or "none"
        raise WasiToolError(
            f"no linear layer matches targets {targets!r}"
            + (f" minus exclude {','.join(excludes)!r}" if excludes else "")
            + f"; linear layers here look like: {sample}"
        )
    return chosen
