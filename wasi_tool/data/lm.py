"""Offline data for causal language models: next-token labels with the prompt masked out.

Three sources, tokenized with the model's own tokenizer:

- a ``.txt`` file: language modelling on its token stream, cut into chunks of ``seq_len``
  tokens (every token is a target; held-out chunks are picked by the seed);
- a ``.jsonl`` file, one example a line: ``{"prompt": ..., "response": ...}`` or
  ``{"messages": [{"role": ..., "content": ...}, ...]}`` (the last message is the response,
  the ones before it the prompt, rendered with the tokenizer's chat template);
- ``emoji-translate``, a built-in task: "Translate this emoji name from English to German:
  grinning face" -> "grinsendes gesicht", from the Unicode CLDR names that ship in the PyPI
  package ``emoji`` (``emoji-translate:N`` for N emoji, ``emoji-translate:N:de,fr`` for some
  target languages; by default 1000 emoji into de, es, fr, it, pt). Split by emoji, so the
  held-out emoji were never seen in training: their exact-match accuracy measures
  generalisation.

A prompt is rendered with the chat template as a user message (when the tokenizer has one),
and the response ends with the end-of-sequence token. Each example is (ids, labels), both
(T,): ids right-padded to one length for the whole dataset (``seq_len`` when given, else the
longest example, at most 128 tokens); ``labels[t]`` is the token that
follows position t when that token belongs to the response (or, for text, to the chunk), else
-100, so padding and the prompt take no part in the loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import Dataset

from wasi_tool.data.cldr import EMOJI_LANGUAGES, emoji_names
from wasi_tool.data.datasets import DataSplits
from wasi_tool.errors import WasiToolError
from wasi_tool.safe_read import loads_json
from wasi_tool.training.loss import IGNORE

EMOJI_TRANSLATE = "emoji-translate"
LANGUAGE_NAMES = {
    "de": "German",
    "es": "Spanish",
    "fr": "French",
    "it": "Italian",
    "pt": "Portuguese",
    "id": "Indonesian",
    "tr": "Turkish",
}
DEFAULT_TRANSLATE_LANGS = ("de", "es", "fr", "it", "pt")
DEFAULT_EMOJI = 1000
DEFAULT_SEQ_LEN = 128  # .txt chunks, and the longest example kept otherwise
LM_SPECS = (EMOJI_TRANSLATE,)


@dataclass
class Example:
    """A prompt (already rendered) and its response; ``answer`` is what exact match checks."""

    prompt: str
    response: str


class LMDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """(N, T) token ids and their (N, T) next-token labels; for prompt/response data also the
    prompts' ids and the reference answers (exact match and generation samples)."""

    def __init__(
        self,
        ids: torch.Tensor,
        labels: torch.Tensor,
        prompts: Sequence[list[int]] = (),
        answers: Sequence[str] = (),
    ) -> None:
        self.ids = ids
        self.labels = labels
        self.prompts = list(prompts)
        self.answers = list(answers)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[idx], self.labels[idx]


def _splits(train: LMDataset, test: LMDataset, classes: list[str], what: str) -> DataSplits:
    return DataSplits(cast(Any, train), cast(Any, test), classes, what)


def is_lm_spec(spec: str | Path) -> bool:
    text = str(spec)
    return text.split(":", 1)[0] in LM_SPECS or text.endswith((".txt", ".jsonl"))


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text the model sees before its answer: the chat template with the
    generation prompt when the tokenizer has one, else the messages' contents, one a line."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text: str = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return text
        except Exception as exc:  # a template that rejects these roles, ...
            raise WasiToolError(f"cannot apply the tokenizer's chat template: {exc}") from None
    return "".join(f"{m['content']}\n" for m in messages)


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a rendered prompt (a chat template brings its own special tokens)."""
    specials = not getattr(tokenizer, "chat_template", None)
    return list(tokenizer(prompt, add_special_tokens=specials)["input_ids"])


def _eos(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise WasiToolError("the tokenizer has no end-of-sequence token; responses need one")
    return int(eos)


def _pad(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else _eos(tokenizer)


def encode_examples(
    tokenizer: Any, examples: Sequence[Example], seq_len: int, what: str, fixed: bool = False
) -> LMDataset:
    """Tokenize prompt/response pairs (see the module doc); examples longer than ``seq_len``
    are cut, and those whose response is cut away entirely are dropped. Padded to the longest
    example, or to exactly ``seq_len`` when ``fixed``."""
    eos, pad = _eos(tokenizer), _pad(tokenizer)
    rows, prompts, answers = [], [], []
    for ex in examples:
        p = prompt_ids(tokenizer, ex.prompt)
        r = [*tokenizer(ex.response, add_special_tokens=False)["input_ids"], eos]
        full = (p + r)[: seq_len + 1]
        if len(full) <= len(p):
            continue
        rows.append((full, len(p)))
        prompts.append(p)
        answers.append(ex.response)
    if not rows:
        raise WasiToolError(f"{what}: no example fits in {seq_len} tokens with its response")
    length = seq_len if fixed else min(seq_len, max(len(full) - 1 for full, _ in rows))
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for i, (full, start) in enumerate(rows):
        n = min(len(full), length)
        ids[i, :n] = torch.tensor(full[:n])
        # position t predicts full[t + 1]; the response starts at full[start]
        for t in range(start - 1, len(full) - 1):
            if t < length:
                labels[i, t] = full[t + 1]
    return LMDataset(ids, labels, prompts, answers)


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = np.random.default_rng(seed).permutation(n)
    held = max(1, math.ceil(val_fraction * n))
    if n - held < 1:
        raise WasiToolError(f"too little data to hold out {val_fraction:.0%}: {n} examples")
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


def text_chunks(
    path: Path, tokenizer: Any, seq_len: int, val_fraction: float, seed: int
) -> DataSplits:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WasiToolError(f"cannot read {path}: {exc}") from None
    stream = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    chunks = max(0, math.ceil((len(stream) - 1) / seq_len))
    if chunks < 2:
        raise WasiToolError(
            f"{path} has {len(stream)} tokens: too few for two chunks of {seq_len} (--seq-len)"
        )
    pad = _pad(tokenizer)
    ids = torch.full((chunks, seq_len), pad, dtype=torch.long)
    labels = torch.full((chunks, seq_len), IGNORE, dtype=torch.long)
    for c in range(chunks):
        piece = stream[c * seq_len : c * seq_len + seq_len + 1]
        ids[c, : min(seq_len, len(piece))] = torch.tensor(piece[:seq_len])
        labels[c, : len(piece) - 1] = torch.tensor(piece[1:])
    train, test = _split(chunks, val_fraction, seed)
    return _splits(
        LMDataset(ids[train], labels[train]),
        LMDataset(ids[test], labels[test]),
        [],
        f"{path.name}: {len(stream)} tokens in {chunks} chunks of {seq_len}, "
        f"{len(train)} train / {len(test)} held out",
    )


def _jsonl_examples(path: Path, tokenizer: Any) -> list[Example]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise WasiToolError(f"cannot read {path}: {exc}") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = loads_json(line, where)
        except WasiToolError as exc:
            raise WasiToolError(
                f"{where}: {exc}".replace(f"{where}: cannot read {where}: ", f"{where}: ")
            ) from None
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            msgs = row["messages"]
            ok = len(msgs) >= 2 and all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in msgs
            )
            if not ok:
                raise WasiToolError(
                    f"{where}: messages must be 2 or more {{'role', 'content'}} strings"
                )
            prompt = render_prompt(tokenizer, [dict(m) for m in msgs[:-1]])
            examples.append(Example(prompt, msgs[-1]["content"]))
        elif (
            isinstance(row, dict)
            and isinstance(row.get("prompt"), str)
            and isinstance(row.get("response"), str)
        ):
            prompt = render_prompt(tokenizer, [{"role": "user", "content": row["prompt"]}])
            examples.append(Example(prompt, row["response"]))
        else:
            raise WasiToolError(
                f'{where}: expected {{"prompt": str, "response": str}} or {{"messages": [...]}}'
            )
    if len(examples) < 2:
        raise WasiToolError(f"{path}: need at least 2 examples, found {len(examples)}")
    return examples


def jsonl_pairs(
    path: Path, tokenizer: Any, seq_len: int, val_fraction: float, seed: int, fixed: bool = False
) -> DataSplits:
    examples = _jsonl_examples(path, tokenizer)
    train, test = _split(len(examples), val_fraction, seed)
    what = str(path)
    tr = encode_examples(tokenizer, [examples[i] for i in train], seq_len, what, fixed)
    te = encode_examples(tokenizer, [examples[i] for i in test], seq_len, what, fixed)
    return _splits(
        tr,
        te,
        [],
        f"{path.name}: {len(tr)} train / {len(te)} held-out prompt/response pairs",
    )


def _translate_spec(spec: str) -> tuple[int, tuple[str, ...]]:
    parts = spec.split(":")
    count = DEFAULT_EMOJI
    langs: tuple[str, ...] = DEFAULT_TRANSLATE_LANGS
    if len(parts) > 3:
        raise WasiToolError(f"{EMOJI_TRANSLATE}[:N[:de,fr]] takes at most two arguments: {spec}")
    if len(parts) > 1 and parts[1]:
        try:
            count = int(parts[1])
        except ValueError:
            raise WasiToolError(
                f"{EMOJI_TRANSLATE}:N takes a number of emoji, got {parts[1]!r}"
            ) from None
        if count < 2:
            raise WasiToolError(f"{EMOJI_TRANSLATE}:N needs N >= 2, got {count}")
    if len(parts) > 2:
        langs = tuple(v.strip() for v in parts[2].split(",") if v.strip())
        bad = [v for v in langs if v not in LANGUAGE_NAMES]
        if bad or not langs:
            raise WasiToolError(
                f"{EMOJI_TRANSLATE}: languages are among {', '.join(LANGUAGE_NAMES)}, got {bad}"
            )
    return count, langs


def emoji_translate(
    spec: str, tokenizer: Any, seq_len: int, val_fraction: float, seed: int, fixed: bool = False
) -> DataSplits:
    count, langs = _translate_spec(spec)
    rows = emoji_names()
    count = min(count, len(rows))
    picked = np.random.default_rng(seed).permutation(len(rows))[:count]
    held = max(1, math.ceil(val_fraction * count))
    sides = {"train": sorted(picked[held:].tolist()), "test": sorted(picked[:held].tolist())}
    column = {lang: EMOJI_LANGUAGES.index(lang) for lang in langs}

    def examples(idx: list[int]) -> list[Example]:
        out = []
        for i in idx:
            for lang in langs:
                ask = (
                    f"Translate this emoji name from English to {LANGUAGE_NAMES[lang]}: "
                    f"{rows[i][0]}"
                )
                out.append(
                    Example(
                        render_prompt(tokenizer, [{"role": "user", "content": ask}]),
                        rows[i][column[lang]],
                    )
                )
        return out

    try:
        sets = {
            side: encode_examples(tokenizer, examples(idx), seq_len, EMOJI_TRANSLATE, fixed)
            for side, idx in sides.items()
        }
    except WasiToolError:
        raise
    except Exception as exc:
        raise WasiToolError(f"cannot tokenize {EMOJI_TRANSLATE}: {exc}") from None
    train, test = sets["train"], sets["test"]
    return _splits(
        train,
        test,
        [],
        f"{EMOJI_TRANSLATE}: Unicode CLDR emoji names (PyPI package emoji) from English to "
        f"{', '.join(langs)}, {len(train)} train / {len(test)} held-out pairs of {count} emoji "
        f"(split by emoji), {train.ids.shape[1]} tokens",
    )


def load_lm_data(
    spec: str | Path,
    tokenizer: Any,
    seq_len: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> DataSplits:
    """Causal-LM data named by ``spec`` (see the module doc). Prompt/response examples are
    padded to exactly ``seq_len`` when it is given, else to the longest (at most 128)."""
    fixed = seq_len is not None
    seq_len = seq_len or DEFAULT_SEQ_LEN
    if seq_len < 2:
        raise WasiToolError(f"seq_len must be >= 2, got {seq_len}")
    text = str(spec)
    if text.split(":", 1)[0] == EMOJI_TRANSLATE:
        return emoji_translate(text, tokenizer, seq_len, val_fraction, seed, fixed)
    path = Path(text)
    if not path.is_file():
        raise WasiToolError(
            f"causal-LM data is a .txt or .jsonl file or {EMOJI_TRANSLATE}; no such file: {path}"
        )
    if path.suffix == ".txt":
        return text_chunks(path, tokenizer, seq_len, val_fraction, seed)
    if path.suffix == ".jsonl":
        return jsonl_pairs(path, tokenizer, seq_len, val_fraction, seed, fixed)
    raise WasiToolError(f"causal-LM data must be .txt or .jsonl, got {path.name}")
