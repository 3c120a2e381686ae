"""A method's own settings: one dataclass in the method's module, named by its spec.

``LoraOptions`` (methods/lora.py), ``BsrOptions`` (methods/bsr.py) and ``MezoOptions``
(methods/mezo.py) subclass ``MethodOptions``; a method names its class in ``Method.options``
and the registry (``methods.base.options_classes``) lists them, so a config holds the one
options object of its method (``FinetuneConfig.options``) without knowing the method.

Each field has a *flat key*, the name it has in recipes, ``--set``, stored configs and the CLI
(``lora_rank``, ``bsr_blocks``, ``mezo_mu``): the class's ``prefix`` and the field's name, or
the field's ``flat`` metadata. An options class validates (and normalises) its own values in
``check``, run on construction; its messages name the flat keys.

Torch-free: the CLI's generated defaults and the configs read these classes.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

OptionsT = TypeVar("OptionsT", bound="MethodOptions")


@dataclass
class MethodOptions:
    """Base class of a method's options (a dataclass of plain values with defaults)."""

    prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Validate and normalise the values; raise WasiToolError naming the flat key."""

    @classmethod
    def flat_keys(cls) -> dict[str, str]:
        """Field name -> flat key (``rank`` -> ``lora_rank``)."""
        return {
            f.name: str(f.metadata.get("flat", cls.prefix + f.name))
            for f in dataclasses.fields(cls)
        }

    @classmethod
    def flat_hints(cls) -> dict[str, object]:
        """Flat key -> the field's type (what a recipe or a settings file must give)."""
        hints = typing.get_type_hints(cls)
        return {flat: hints[name] for name, flat in cls.flat_keys().items()}

    @classmethod
    def flat_defaults(cls) -> dict[str, object]:
        """Flat key -> the field's default."""
        return {flat: getattr(cls(), name) for name, flat in cls.flat_keys().items()}

    @classmethod
    def from_flat(cls: type[OptionsT], data: Mapping[str, object]) -> OptionsT:
        """The options from flat keys (the missing ones at their defaults; others ignored)."""
        kwargs: dict[str, Any] = {
            name: data[flat] for name, flat in cls.flat_keys().items() if flat in data
        }
        return cls(**kwargs)

    def to_flat(self) -> dict[str, object]:
        """The values under their flat keys (lists copied)."""
        return {flat: _copied(getattr(self, name)) for name, flat in type(self).flat_keys().items()}


def _copied(value: object) -> object:
    return list(value) if isinstance(value, list) else value


def options_of(settings: object, cls: type[OptionsT]) -> OptionsT:
    """``settings.options`` when it is a ``cls``, else ``cls``'s defaults (a method reads its
    own options from the config it is given)."""
    found = getattr(settings, "options", None)
    return found if isinstance(found, cls) else cls()
