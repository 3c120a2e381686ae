"""Evaluating a causal LM: held-out perplexity, exact match of greedy answers, a sample."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from wasi_tool.training.loop import evaluate

if TYPE_CHECKING:
    from wasi_tool.training.results import LMEvalRecord

SAMPLE_TOKENS = 24


def normalise(text: str) -> str:
    """What exact match compares: lower case, surrounding space and inner runs of it removed."""
    return " ".join(text.strip().lower().split())


@dataclass
class LMEval:
    """Held-out figures of a causal LM at one point of training."""

    loss: float  # mean cross-entropy per predicted token (prompt and padding left out)
    perplexity: float
    token_accuracy: float
    exact_match: float | None = None  # greedy answers equal to the reference (normalised)
    exact_match_count: int = 0  # how many held-out examples were checked
    samples: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> LMEvalRecord:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "token_accuracy": self.token_accuracy,
            "exact_match": self.exact_match,
            "exact_match_count": self.exact_match_count,
            "samples": [dict(s) for s in self.samples],
            "seconds": self.seconds,
        }


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    test_set: Dataset[Any],
    tokenizer: Any,
    batch_size: int,
    examples: int = 32,
    samples: int = 2,
) -> LMEval:
    """Perplexity over the whole held-out set; for prompt/response data, greedy answers to
    the first ``examples`` held-out prompts scored by exact match, and the first ``samples``
    of them kept as generation samples."""
    from wasi_tool.models import hf

    start = time.perf_counter()
    scores = evaluate(model, test_set, lambda x: x, batch_size)
    loss = scores["loss"]
    result = LMEval(loss, math.exp(min(loss, 50.0)), scores["accuracy"])
    prompts: list[list[int]] = list(getattr(test_set, "prompts", []))
    answers: list[str] = list(getattr(test_set, "answers", []))
    n = min(examples, len(prompts))
    hits = 0
    context = hf.context_length(model)[0]
    for i in range(n):
        limit = len(tokenizer(answers[i], add_special_tokens=False)["input_ids"]) + 4
        # the prompt and the answer's length together within the model's context
        limit = max(1, min(limit, context - len(prompts[i])))
        new = hf.generate(model, prompts[i], limit)
        text = tokenizer.decode(new, skip_special_tokens=True)
        hits += normalise(text) == normalise(answers[i])
        if i < samples:
            prompt = tokenizer.decode(prompts[i], skip_special_tokens=False)
            result.samples.append({"prompt": prompt, "reference": answers[i], "generated": text})
    if n:
        result.exact_match = hits / n
        result.exact_match_count = n
    elif samples and len(test_set):  # type: ignore[arg-type]  # text chunks: continue the first held-out chunk
        ids, _ = test_set[0]
        head = ids[: max(1, len(ids) // 2)].tolist()
        new = hf.generate(model, head, max(1, min(SAMPLE_TOKENS, context - len(head))))
        result.samples.append(
            {
                "prompt": tokenizer.decode(head),
                "reference": tokenizer.decode(ids[len(head) :].tolist()),
                "generated": tokenizer.decode(new),
            }
        )
    result.seconds = round(time.perf_counter() - start, 3)
    return result
