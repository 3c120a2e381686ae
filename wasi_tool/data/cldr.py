"""Unicode CLDR names of emoji in 8 languages, from the PyPI package ``emoji`` (offline)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from wasi_tool.errors import WasiToolError

EMOJI_LANGUAGES = ("en", "de", "es", "fr", "it", "pt", "id", "tr")


def emoji_names() -> list[list[str]]:
    """Per emoji (in code point order), its name in each of EMOJI_LANGUAGES, as plain text."""
    try:
        codes = resources.files("emoji") / "unicode_codes"
        tables: dict[str, dict[str, Any]] = {}
        for lang in EMOJI_LANGUAGES:
            name = "emoji.json" if lang == "en" else f"emoji_{lang}.json"
            tables[lang] = json.loads((codes / name).read_text(encoding="utf-8"))
    except ModuleNotFoundError:
        raise WasiToolError(
            "the emoji datasets needs the PyPI package 'emoji' (pip install emoji)"
        ) from None
    except (OSError, ValueError) as exc:
        raise WasiToolError(f"cannot read the emoji package's name tables: {exc}") from None

    def plain(name: Any) -> str:
        if isinstance(name, dict):
            name = name.get("en", "")
        return str(name).strip(":").replace("_", " ")

    rows = []
    for char in sorted(tables["en"]):
        names = [plain(tables[lang].get(char, "")) for lang in EMOJI_LANGUAGES]
        if all(names):
            rows.append(names)
    return rows
