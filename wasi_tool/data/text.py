"""Offline text classification data for Hugging Face models, tokenized with the model's tokenizer.

``emoji-lang``: language identification of the short names of emoji, as translated by the
Unicode CLDR annotations and shipped in the PyPI package ``emoji`` (its
``emoji/unicode_codes/emoji*.json`` files; nothing is downloaded). Each emoji has a name in
each of 8 Latin-script languages, e.g. "grinning face" (en), "grinsendes gesicht" (de), "cara
sonriendo" (es), "visage rieur" (fr), "faccina con un gran sorriso" (it), "rosto risonho" (pt),
"wajah gembira" (id) and its Turkish name (tr); the task is to say which language a name is in
(8 classes, balanced). Train and held-out sets are split by emoji, so no emoji has names on both
sides. ``emoji-lang`` uses 1000 emoji (8000 names), ``emoji-lang:N`` N of them (at most all,
about 5000), picked by the seed.

A batch is a (B, T) int64 tensor of token ids, padded to one length T for the whole dataset (so
activation shapes, and the WASI ranks fixed on them, do not change between batches); the model
derives its attention mask from the padding id.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from wasi_tool.data.cldr import EMOJI_LANGUAGES, emoji_names
from wasi_tool.data.datasets import BatchTransform, DataSplits, load_data, select_classes
from wasi_tool.errors import WasiToolError
from wasi_tool.models import hf
from wasi_tool.models.families import family_of

EMOJI_LANG = "emoji-lang"
DEFAULT_EMOJI = 1000
MAX_TOKENS = 64
TEXT_DATASETS = (EMOJI_LANG,)


class TokenDataset(Dataset[tuple[torch.Tensor, int]]):
    """Token ids (N, T), padded, with integer labels; ``texts`` kept for inspection."""

    def __init__(self, ids: torch.Tensor, labels: Sequence[int], texts: Sequence[str]) -> None:
        self.ids = ids
        self.labels = list(labels)
        self.texts = list(texts)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        return self.ids[idx], self.labels[idx]


class TokenBatch(BatchTransform):
    """The batch transform of a text model: token ids pass through unchanged."""

    def __init__(self, seq_len: int = hf.DEFAULT_SEQ_LEN) -> None:
        self.size = seq_len

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return ids

    def config(self) -> dict[str, Any]:
        return {"tokens": "ids padded to one length per dataset", "random_seq_len": self.size}


def is_text_spec(spec: str | Path) -> bool:
    return str(spec).split(":", 1)[0] in TEXT_DATASETS


def _emoji_count(spec: str) -> int:
    _, _, arg = spec.partition(":")
    if not arg:
        return DEFAULT_EMOJI
    try:
        count = int(arg)
    except ValueError:
        raise WasiToolError(f"{EMOJI_LANG}:N takes a number of emoji, got {arg!r}") from None
    if count < 2:
        raise WasiToolError(f"{EMOJI_LANG}:N needs N >= 2, got {count}")
    return count


def emoji_lang(spec: str, tokenizer: Any, val_fraction: float = 0.1, seed: int = 0) -> DataSplits:
    """The emoji-lang splits, tokenized (see the module doc)."""
    rows = emoji_names()
    count = min(_emoji_count(spec), len(rows))
    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(rows))[:count]
    held = max(1, math.ceil(val_fraction * count))
    sides = {"train": sorted(picked[held:].tolist()), "test": sorted(picked[:held].tolist())}
    texts = {
        side: [(rows[i][k], k) for i in idx for k in range(len(EMOJI_LANGUAGES))]
        for side, idx in sides.items()
    }
    everything = [t for pairs in texts.values() for t, _ in pairs]
    try:
        lengths = tokenizer(everything, truncation=True, max_length=MAX_TOKENS)["input_ids"]
        seq_len = max(len(ids) for ids in lengths)
        sets = {}
        for side, pairs in texts.items():
            enc = tokenizer(
                [t for t, _ in pairs],
                padding="max_length",
                truncation=True,
                max_length=seq_len,
                return_tensors="pt",
            )
            sets[side] = TokenDataset(
                enc["input_ids"].long(), [y for _, y in pairs], [t for t, _ in pairs]
            )
    except Exception as exc:  # a tokenizer without a padding token, ...
        raise WasiToolError(f"cannot tokenize {EMOJI_LANG}: {exc}") from None
    train, test = sets["train"], sets["test"]
    return DataSplits(
        train,
        test,
        list(EMOJI_LANGUAGES),
        f"{EMOJI_LANG}: language of Unicode CLDR emoji names (PyPI package emoji), "
        f"{len(train)} train / {len(test)} held-out names of {count} emoji, {seq_len} tokens",
    )


def load_text_data(
    spec: str | Path,
    tokenizer_dir: Path | None,
    val_fraction: float = 0.1,
    seed: int = 0,
    classes: Sequence[int] | None = None,
) -> DataSplits:
    """A text dataset named by ``spec``, tokenized with the tokenizer in ``tokenizer_dir``."""
    if not is_text_spec(spec):
        raise WasiToolError(
            f"a text model needs a text dataset ({', '.join(TEXT_DATASETS)}), got {spec}"
        )
    splits = emoji_lang(str(spec), hf.load_tokenizer(tokenizer_dir), val_fraction, seed)
    if classes:
        splits = select_classes(splits, classes)
    return splits


def load_task_data(
    loaded: Any,
    spec: str | Path,
    size: int,
    val_fraction: float = 0.1,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    seq_len: int | None = None,
) -> DataSplits:
    """Text data for a Hugging Face model (causal-LM data, wasi_tool.data.lm, for a causal
    LM), images (``load_data``) for any other model."""
    from wasi_tool.data import lm

    family = family_of(loaded.model)
    if family.task(loaded.model).next_token:
        if is_text_spec(spec) or not lm.is_lm_spec(spec):
            raise WasiToolError(
                f"a causal LM trains on {lm.EMOJI_TRANSLATE}, a .txt or a .jsonl file, got {spec}"
            )
        if classes:
            raise WasiToolError("classes do not apply to causal-LM data")
        tokenizer = hf.load_tokenizer(loaded.tokenizer_dir)
        return lm.load_lm_data(spec, tokenizer, seq_len, val_fraction, seed)
    if lm.is_lm_spec(spec):
        kind = "text classifier" if family.reads_text else "vision model"
        raise WasiToolError(f"{spec} is causal-LM data (--task causal-lm); this is a {kind}")
    if family.reads_text:
        return load_text_data(spec, loaded.tokenizer_dir, val_fraction, seed, classes)
    if is_text_spec(spec):
        raise WasiToolError(f"{spec} is a text dataset; this model takes images")
    return load_data(spec, size, val_fraction, seed, classes)


def check_inputs(
    loaded: Any,
    check_batch: int,
    gen: torch.Generator,
    data: str | None = None,
    count: int = 32,
) -> list[tuple[str, torch.Tensor]]:
    """Inputs to compare an exported text model with torch on: random token ids at batch 1 and
    ``check_batch`` (two lengths), a padded batch, and the first held-out texts of ``data``."""
    model = loaded.model
    sets = [
        (f"random ids 1 x {hf.DEFAULT_SEQ_LEN}", hf.random_token_ids(model, 1, gen=gen)),
        (f"random ids {check_batch} x 40", hf.random_token_ids(model, check_batch, 40, gen)),
    ]
    pad = model.config.pad_token_id
    if pad is not None:
        padded = hf.random_token_ids(model, check_batch, hf.DEFAULT_SEQ_LEN, gen)
        for row in range(check_batch):
            padded[row, hf.DEFAULT_SEQ_LEN - row - 1 :] = int(pad)  # 1 .. B padding tokens
        sets.append((f"padded ids {check_batch} x {hf.DEFAULT_SEQ_LEN}", padded))
    if data is not None:
        test = load_task_data(loaded, data, hf.DEFAULT_SEQ_LEN).test
        ids = getattr(test, "ids", None)
        assert isinstance(ids, torch.Tensor)
        n = min(count, len(ids))
        sets.append((f"{n} held-out texts of {data}", ids[:n]))
    return sets
