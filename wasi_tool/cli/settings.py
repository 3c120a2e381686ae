"""Command-line options built from a training config's settings (their types, defaults and
help), so a command exposes what its config takes without restating a field.

``takes_settings("FinetuneConfig")`` gives a command one option per setting of the config that
its own signature does not already declare: ``--lora-rank`` from ``LoraOptions.rank`` (flat key
``lora_rank``), ``--act-eps`` from ``ActivationRanks.act_eps``... The command receives them in
its ``**settings`` and turns them into the config's flat settings with ``flat_settings``. The
types, defaults and help come from ``cli/defaults.py`` (generated from the dataclasses), so
``--help`` does not import torch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Annotated, TypeVar

import typer

from wasi_tool.cli.defaults import DEFAULTS, SETTINGS
from wasi_tool.errors import WasiToolError

F = TypeVar("F", bound=Callable[..., None])
SCALARS: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}
INTS = "list[int]"  # given as comma-separated integers on the command line


@dataclass(frozen=True)
class Setting:
    """One setting of a config as the command line takes it."""

    key: str
    kind: str  # int, float, str, bool, or list[int] (comma-separated text)
    optional: bool
    default: object
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def parameter(self, prefix: str = "") -> inspect.Parameter:
        base = str if self.kind == INTS else SCALARS[self.kind]
        hint = base | None if self.optional or self.kind == INTS else base
        text = prefix + self.help[:1].upper() + self.help[1:]
        default = None if self.kind == INTS else self.default
        option = typer.Option(help=text, show_default=default is not None)
        return inspect.Parameter(
            self.key,
            inspect.Parameter.KEYWORD_ONLY,
            default=default,
            annotation=Annotated[hint, option],
        )


def settings_of(config: str) -> list[Setting]:
    """The settings of ``config`` the command line can give (plain values and integer lists;
    a setting of another type, e.g. ranks per layer, is a recipe's or a file's only)."""
    found = []
    for key, (kind, text) in SETTINGS[config].items():
        parts = [p.strip() for p in kind.split("|")]
        optional = "None" in parts
        base = [p for p in parts if p != "None"]
        if len(base) != 1 or (base[0] not in SCALARS and base[0] != INTS):
            continue
        found.append(Setting(key, base[0], optional, DEFAULTS[config][key], text))
    return found


def takes_settings(config: str, skip: Collection[str] = (), prefix: str = "") -> Callable[[F], F]:
    """Decorator: the command takes every setting of ``config`` as an option, except ``skip``
    and those its own signature declares (which keep their flags and help); they reach its
    ``**settings``. ``prefix`` starts each generated help text (e.g. "--train: ")."""

    def wrap(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        taken = {p.name for p in own} | set(skip)
        added = [s.parameter(prefix) for s in settings_of(config) if s.key not in taken]
        command.__signature__ = signature.replace(parameters=[*own, *added])  # type: ignore[attr-defined]
        return command

    return wrap


def flat_settings(config: str, given: Mapping[str, object]) -> dict[str, object]:
    """The command's ``**settings`` as the config's flat settings: integer lists parsed from
    their comma-separated text ("" is an empty list), the rest as typed."""
    kinds = {s.key: s for s in settings_of(config)}
    out: dict[str, object] = {}
    for key, value in given.items():
        setting = kinds[key]
        if setting.kind == INTS:
            out[key] = ints(value, setting.flag) if value is not None else setting.default
        else:
            out[key] = value
    return out


def ints(text: object, what: str) -> list[int]:
    """Comma-separated integers ("" is none)."""
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise WasiToolError(f"{what} takes comma-separated integers, got {text!r}") from None
