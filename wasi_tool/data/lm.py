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

import contextlib
import math
import sys
import time
import types
from collections.abc import Iterator, Sequence
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


# A chat template is a program from a file: its rendering gets a budget of template steps
# (lines of the compiled template run, loops included) and of seconds, so that a template can
# fail but not hang. A real template renders a conversation in a few hundred steps.
TEMPLATE_STEPS = 1_000_000
TEMPLATE_SECONDS = 20.0
_TEMPLATE_CODE = "<template>"  # the file name Jinja compiles a template from a string under


@contextlib.contextmanager
def _template_budget(
    steps: int = TEMPLATE_STEPS, seconds: float = TEMPLATE_SECONDS
) -> Iterator[None]:
    """Count the lines the compiled Jinja template runs in this thread (a trace function on
    its frames only) and stop it with a WasiToolError past ``steps`` or ``seconds``."""
    count = 0
    deadline = time.monotonic() + seconds

    def step(frame: types.FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
            if count > steps or (count % 4096 == 0 and time.monotonic() > deadline):
                raise WasiToolError(
                    f"the tokenizer's chat template ran more than {steps} steps or "
                    f"{seconds:g} s; refusing it (a template that loops?)"
                )
        return step

    def calls(frame: types.FrameType, event: str, arg: Any) -> Any:
        return step if frame.f_code.co_filename == _TEMPLATE_CODE else None

    before = sys.gettrace()
    sys.settrace(calls)
    try:
        yield
    finally:
        sys.settrace(before)


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text the model sees before its answer: the chat template with the
    generation prompt when the tokenizer has one (within a step budget), else the messages'
    contents, one a line."""
    if getattr(tokenizer, "chat_template", None):
        try:
            with _template_budget():
                text = tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
        except WasiToolError:
            raise
        except Exception as exc:  # a template that rejects these roles, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WasiToolError(f"cannot apply the tokenizer's chat template: {first}") from None
        if not isinstance(text, str):
            raise WasiToolError("the tokenizer's chat template did not render text")
        return text
    return "".join(f"{m['content']}\n" for m in messages)


# Text is cut before it reaches the tokenizer: a tokenizer given a 10 MB line at once may
# abort the process. ``token_prefix`` tokenizes a prefix a few times longer than the tokens
# asked for would need, growing it only while it gives too few tokens.
CHARS_PER_TOKEN = 8
_PREFIX_MARGIN = 16  # tokens past the count, so the cut's own last tokens are never used
PIECE_CHARS = 1 << 16  # .txt data: tokenized in pieces of at most this many characters
WORD_CHARS = 1 << 12  # a piece without whitespace


def token_prefix(
    tokenizer: Any, text: str, count: int, add_special_tokens: bool = False
) -> tuple[list[int], bool]:
    """The first ``count`` token ids of ``text`` (at most), from a bounded prefix of it, and
    whether the text had more. The tokenizer never sees more than 4 * PIECE_CHARS characters
    at once (about ``count * CHARS_PER_TOKEN`` for ordinary text)."""
    limit = max(256, (count + _PREFIX_MARGIN) * CHARS_PER_TOKEN)
    while True:
        piece = text[:limit]
        try:
            ids = list(tokenizer(piece, add_special_tokens=add_special_tokens)["input_ids"])
        except Exception as exc:
            raise WasiToolError(f"cannot tokenize the text: {exc}") from None
        if len(piece) == len(text):
            return ids[:count], len(ids) > count
        if len(ids) > count + _PREFIX_MARGIN or limit >= PIECE_CHARS * 4:
            return ids[:count], True
        limit = min(limit * 4, PIECE_CHARS * 4)


def prompt_ids(tokenizer: Any, prompt: str, limit: int | None = None) -> list[int]:
    """Token ids of a rendered prompt (a chat template brings its own special tokens); with
    ``limit``, at most ``limit`` + 1 of them (one more says the prompt is longer), from a
    bounded prefix of the text."""
    specials = not getattr(tokenizer, "chat_template", None)
    if limit is None:
        return list(tokenizer(prompt, add_special_tokens=specials)["input_ids"])
    return token_prefix(tokenizer, prompt, limit + 1, specials)[0]


def stream_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a whole text, tokenized in pieces of at most PIECE_CHARS characters, each
    cut before a whitespace character where there is one (a pre-token boundary)."""
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + PIECE_CHARS)
        if end < len(text):
            cut = max(text.rfind(c, start + 1, end) for c in " \n\t")
            # no whitespace: a hard cut, shorter (one word's merges grow with its length)
            end = cut if cut > start else min(end, start + WORD_CHARS)
        try:
            ids += tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
        except Exception as exc:
            raise WasiToolError(f"cannot tokenize the text: {exc}") from None
        start = end
    return ids


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
        # both cut before tokenizing: a prompt longer than seq_len drops the example anyway,
        # and no more of the response than fits after the prompt is ever used
        p = prompt_ids(tokenizer, ex.prompt, seq_len)
        kept, more = token_prefix(tokenizer, ex.response, max(0, seq_len + 1 - len(p)))
        full = [*p, *kept, eos][: seq_len + 1]
        if len(full) <= len(p):
            continue
        rows.append((full, len(p)))
        prompts.append(p)
        # the reference answer is what the example trains on: a response cut at seq_len is
        # cut here too (exact match never tokenizes or generates past what fits)
        answers.append(tokenizer.decode(kept, skip_special_tokens=True) if more else ex.response)
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
    stream = stream_ids(tokenizer, text)
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
