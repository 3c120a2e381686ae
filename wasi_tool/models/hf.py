"""Hugging Face ``transformers`` text models from a local directory or a ``.gguf``, offline.

A directory with a ``config.json`` (as ``save_pretrained`` writes it) whose architecture is a
``*ForCausalLM`` loads as a causal LM (task ``causal-lm``: next-token logits), and so does a
``.gguf`` file (dequantised to float32 by transformers with the ``gguf`` package). Any other
directory, or any with task ``classify`` or a class count, loads as a sequence classifier,
``AutoModelForSequenceClassification``: BERT-family encoders (BERT, MiniLM, RoBERTa,
DistilBERT, ...) and Llama-family decoders (Llama, Mistral, Qwen2, ...), whose
sequence-classification head scores the last non-padding token. Base-model weights (a
``BertModel`` or a ``LlamaForCausalLM`` checkpoint) load into it with a new, seeded head.

The model keeps the Hugging Face module names (``bert.encoder.layer.0.intermediate.dense``,
``model.layers.0.mlp.down_proj``), so target globs, artifacts and ``--merge`` exports use
them. Its class is the transformers class with a thin mixin in front: ``forward(input_ids)``
returns the logits tensor (a classifier derives the attention mask from the padding id; a
causal LM needs none, its padding is on the right), so the model takes one (B, T) int64
tensor like a vision model takes images, and exports to ONNX with one input ``input_ids``
(dynamic batch and sequence axes). Nothing is ever fetched from a hub: ``HF_HUB_OFFLINE`` is
set and every load passes ``local_files_only``; remote code is refused.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import weakref
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wasi_tool import artifact as artifacts
from wasi_tool.errors import WasiToolError

HF_ARCH = "hf"
CONFIG = "config.json"
CAUSAL_LM = "causal-lm"  # next-token prediction: the model's logits are (B, T, vocab)
CLASSIFY = "classify"  # a sequence classifier: (B, classes)
TASKS = (CAUSAL_LM, CLASSIFY)
GGUF_SUFFIX = ".gguf"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Files a tokenizer may need; those present are carried into every artifact of the model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
DEFAULT_SEQ_LEN = 16  # the sequence length of random check / bench inputs
# Prompt + generated tokens are bounded by the model's context (its config's position limit),
# and never more than this whatever a config says.
MAX_CONTEXT = 1 << 17
DEFAULT_CONTEXT = 2048  # a config that names no position limit
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx")


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()  # "newly initialized head" is expected here
    transformers.utils.logging.disable_progress_bar()
    return transformers


def is_hf_dir(path: Path) -> bool:
    """A directory holding a transformers ``config.json`` (and not a wasi-tool artifact)."""
    return path.is_dir() and (path / CONFIG).is_file() and not (path / artifacts.MANIFEST).exists()


def is_hf(model: nn.Module) -> bool:
    return isinstance(model, _LogitsMixin)


def is_causal_lm(model: nn.Module) -> bool:
    return isinstance(model, _CausalLMMixin)


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == GGUF_SUFFIX


class _LogitsMixin(nn.Module):
    """Put in front of a transformers ``*ForSequenceClassification`` class (see module doc)."""

    config: Any

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if attention_mask is None:
            pad = self.config.pad_token_id
            attention_mask = (
                torch.ones_like(input_ids) if pad is None else (input_ids != pad).long()
            )
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        logits: torch.Tensor = out.logits
        return logits

    @property
    def num_classes(self) -> int:
        return int(self.config.num_labels)

    def head_name(self) -> str:
        """The classification head's attribute: ``classifier`` (BERT family), ``score`` (Llama
        family)."""
        for name in ("classifier", "score"):
            head = getattr(self, name, None)
            if isinstance(head, nn.Module):
                return name
        raise WasiToolError(f"{type(self).__name__} has no classifier/score head")

    def get_classifier(self) -> nn.Module:
        """The head's final linear (timm's name for it): never a target unless named exactly."""
        head = getattr(self, self.head_name())
        if isinstance(head, nn.Linear):
            return head
        out_proj = getattr(head, "out_proj", None)  # RoBERTa's head: dense -> out_proj
        return out_proj if isinstance(out_proj, nn.Module) else head

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised head for ``num_classes`` (torch's RNG decides its init)."""
        head = self.get_classifier()
        if not isinstance(head, nn.Linear):
            raise WasiToolError(f"cannot replace the head {type(head).__name__}")
        new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
        new.to(dtype=head.weight.dtype)
        nn.init.normal_(new.weight, std=float(getattr(self.config, "initializer_range", 0.02)))
        if new.bias is not None:
            nn.init.zeros_(new.bias)
        for name, mod in self.named_modules():
            if mod is head:
                parent, _, child = name.rpartition(".")
                setattr(self.get_submodule(parent) if parent else self, child, new)
        self.config.num_labels = num_classes
        self.num_labels = num_classes


class _CausalLMMixin(_LogitsMixin):
    """Put in front of a transformers ``*ForCausalLM`` class: ``forward(input_ids)`` returns
    the (B, T, vocab) next-token logits.

    Without an attention mask every position attends to every earlier one: sequences are
    padded on the right, so padding only ever follows the real tokens and, under the causal
    mask, changes none of their logits (the padding id can then also be a real token, as
    SmolLM2's ``<|im_end|>`` is). Any other keyword (``past_key_values``, ``use_cache``, ...:
    what ``generate`` passes) returns the transformers output object unchanged.
    """

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        if kwargs:
            return super(_LogitsMixin, self).forward(
                input_ids=input_ids, attention_mask=attention_mask, **kwargs
            )
        out = super(_LogitsMixin, self).forward(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True
        )
        logits: torch.Tensor = out.logits
        return logits

    @property
    def num_classes(self) -> int:
        return int(self.config.vocab_size)

    def head_name(self) -> str:
        return "lm_head"

    def reset_classifier(self, num_classes: int) -> None:
        raise WasiToolError("a causal language model keeps its vocabulary head")


@cache
def _with_mixin(cls: type, causal: bool = False) -> type:
    mixin = _CausalLMMixin if causal else _LogitsMixin
    return type(f"Wasi{cls.__name__}", (mixin, cls), {"__module__": __name__})


def _model_class(config: Any, task: str) -> type:
    tf = _transformers()
    auto = tf.AutoModelForCausalLM if task == CAUSAL_LM else tf.AutoModelForSequenceClassification
    what = "causal-LM" if task == CAUSAL_LM else "sequence-classification"
    try:
        cls: type = auto._model_mapping[type(config)]
    except KeyError:
        raise WasiToolError(
            f"transformers has no {what} model for model_type "
            f"{getattr(config, 'model_type', '?')!r}"
        ) from None
    return cls


def check_task(task: str | None) -> None:
    if task is not None and task not in TASKS:
        raise WasiToolError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


def default_task(config: Any, task: str | None, num_classes: int | None = None) -> str:
    """``task`` as given; else classify when a class count is given; else causal-lm for a
    ``*ForCausalLM`` checkpoint, classify for any other."""
    check_task(task)
    if task is not None:
        return task
    if num_classes is not None:
        return CLASSIFY
    architectures = getattr(config, "architectures", None) or []
    return CAUSAL_LM if any(a.endswith("ForCausalLM") for a in architectures) else CLASSIFY


def _prepare_config(config: Any, num_classes: int | None, task: str = CLASSIFY) -> Any:
    if num_classes is not None and task == CLASSIFY:
        config.num_labels = num_classes
    if getattr(config, "pad_token_id", None) is None:
        # Decoder configs often have no padding id; the sequence head needs one to find the
        # last real token. End-of-sequence is the usual choice.
        eos = getattr(config, "eos_token_id", None)
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    config._attn_implementation = "eager"  # plain ops: exports to ONNX, same in train and eval
    config.use_cache = False
    return config


def _adopt(model: nn.Module, task: str = CLASSIFY) -> nn.Module:
    cls: Any = type(model)
    model.__class__ = _with_mixin(cls, task == CAUSAL_LM)
    return model.eval()


def retie_(model: nn.Module) -> None:
    """Tie the output embedding to the input one again when the config says so (loading
    weights with ``assign`` replaces the shared parameter with two)."""
    config: Any = getattr(model, "config", None)
    if not is_causal_lm(model) or not getattr(config, "tie_word_embeddings", False):
        return
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()  # type: ignore[operator]
    if isinstance(outputs, nn.Linear) and inputs is not None:
        outputs.weight = inputs.weight


def read_config(directory: Path) -> Any:
    tf = _transformers()
    try:
        return tf.AutoConfig.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # unknown model_type, malformed JSON, remote code...
        raise WasiToolError(f"cannot read {directory / CONFIG}: {exc}") from None


def load_dir(
    directory: Path, num_classes: int | None, seed: int = 0, task: str | None = None
) -> nn.Module:
    """The model of a local transformers directory: a causal LM (the default for a
    ``*ForCausalLM`` checkpoint) or a sequence classifier (new head seeded by ``seed``)."""
    if not any((directory / f).is_file() for f in WEIGHT_FILES):
        raise WasiToolError(
            f"{directory} has a {CONFIG} but no weights ({' or '.join(WEIGHT_FILES)})"
        )
    config = read_config(directory)
    task = default_task(config, task, num_classes)
    config = _prepare_config(config, num_classes, task)
    cls = _model_class(config, task)
    torch.manual_seed(seed)  # the head, when it is new
    try:
        model = cls.from_pretrained(  # type: ignore[attr-defined]
            str(directory),
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=(directory / WEIGHT_FILES[0]).is_file() or None,
        )
    except Exception as exc:
        raise WasiToolError(f"cannot load the weights in {directory}: {exc}") from None
    return _adopt(model.float(), task)


def random_dir(directory: Path, task: str | None, seed: int = 0) -> nn.Module:
    """A random-init model from the ``config.json`` of ``directory`` alone (no weights read):
    the published shapes of a model, for memory and time figures that do not depend on the
    values. transformers' own init, drawn with ``seed``."""
    config = read_config(directory)
    task = default_task(config, task)
    config = _prepare_config(config, None, task)
    cls = _model_class(config, task)
    torch.manual_seed(seed)
    try:
        model = cls(config)
    except Exception as exc:
        raise WasiToolError(
            f"cannot build {cls.__name__} from {directory / CONFIG}: {exc}"
        ) from None
    return _adopt(model.float(), task)


def _check_gguf_header(path: Path) -> None:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise WasiToolError(f"cannot read {path}: {exc.strerror or exc}") from None
    if magic != b"GGUF":
        raise WasiToolError(f"{path} is not a GGUF file (no GGUF magic number)")


def load_gguf(path: Path, task: str | None = None) -> tuple[nn.Module, Path]:
    """A ``.gguf`` file as a causal LM, dequantised to float32 by transformers (with the
    ``gguf`` package), and its tokenizer (chat template included) saved to a temporary
    directory, so that artifacts carry it like any other tokenizer. Returns both."""
    if task not in (None, CAUSAL_LM):
        raise WasiToolError(f"a GGUF file loads as a causal LM, not task {task!r}")
    _check_gguf_header(path)
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ModuleNotFoundError:
        raise WasiToolError(
            "reading .gguf files needs the 'gguf' package (pip install 'wasi-tool[llm]')"
        ) from None
    tf = _transformers()
    import tempfile

    where, name = str(path.parent), path.name
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
        config = tf.AutoConfig.from_pretrained(where, gguf_file=name, local_files_only=True)
        config = _prepare_config(config, None, CAUSAL_LM)
        cls = _model_class(config, CAUSAL_LM)
        # transformers' GGUF reader draws its own tqdm bar on stderr: kept off the terminal
        with contextlib.redirect_stderr(io.StringIO()):
            model = cls.from_pretrained(  # type: ignore[attr-defined]
                where, gguf_file=name, config=config, local_files_only=True, dtype=torch.float32
            )
    except WasiToolError:
        raise
    except Exception as exc:  # truncated tensors, an unsupported architecture, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WasiToolError(f"cannot load GGUF file {path}: {first}") from None
    tok_dir = Path(tempfile.mkdtemp(prefix="wasi-tool-gguf-tokenizer-"))
    try:
        tokenizer.save_pretrained(str(tok_dir))
    except Exception as exc:
        shutil.rmtree(tok_dir, ignore_errors=True)
        raise WasiToolError(f"cannot save the tokenizer of {path}: {exc}") from None
    # the folder lives as long as the model (artifacts copy the tokenizer from it), and goes
    # with it: when the model is collected, or at exit, on success and on failure alike
    weakref.finalize(model, shutil.rmtree, str(tok_dir), True)
    for p in model.parameters():  # transformers refuses .float() on a model read from GGUF
        if p.dtype != torch.float32:
            p.data = p.data.float()
    # what is left of the GGUF reading: the weights are plain float32 tensors now
    model.hf_quantizer = None
    model.is_quantized = False
    return _adopt(model, CAUSAL_LM), tok_dir


def build(kwargs: Mapping[str, object]) -> nn.Module:
    """An uninitialised model from recorded ``model_kwargs`` (``hf_config``, ``num_classes``
    or ``task``, as ``model_kwargs`` writes them)."""
    tf = _transformers()
    raw, task = kwargs.get("hf_config"), kwargs.get("task", CLASSIFY)
    num_classes = kwargs.get("num_classes")
    if not isinstance(task, str) or not (num_classes is None or isinstance(num_classes, int)):
        raise WasiToolError("malformed Hugging Face model record in the artifact")
    try:
        if not isinstance(raw, dict):
            raise TypeError("hf_config is not a JSON object")
        fields = dict(raw)
        model_type = fields.pop("model_type")
        config = tf.AutoConfig.for_model(model_type, **fields)
    except Exception as exc:
        raise WasiToolError(f"malformed Hugging Face config in the artifact: {exc}") from None
    config = _prepare_config(config, num_classes, task)
    cls = _model_class(config, task)
    try:
        model = cls(config)
    except Exception as exc:
        raise WasiToolError(f"cannot build {cls.__name__} from the config: {exc}") from None
    return _adopt(model.float(), task)


def model_kwargs(model: nn.Module) -> dict[str, object]:
    """What ``build`` needs: the transformers config (JSON), the class count, the task."""
    hf_config: Any = model.config
    config = hf_config.to_dict()
    skip = ("transformers_version",)
    keep = {k: v for k, v in config.items() if not k.startswith("_") and k not in skip}
    if is_causal_lm(model):
        return {"hf_config": keep, "task": CAUSAL_LM}
    return {"hf_config": keep, "num_classes": int(hf_config.num_labels)}


def tokenizer_files(directory: Path | None) -> list[Path]:
    """The tokenizer files in ``directory``. In a wasi-tool artifact each must be a regular
    file inside it (``artifacts.safe_member``: a symlink is refused, one line naming it); a
    Hugging Face directory's may be links (the hub cache links snapshots to blobs)."""
    if directory is None:
        return []
    if artifacts.is_wasi_artifact(directory):
        return [
            artifacts.safe_member(directory, f)
            for f in TOKENIZER_FILES
            if os.path.lexists(directory / f)
        ]
    return [directory / f for f in TOKENIZER_FILES if (directory / f).is_file()]


def copy_tokenizer(directory: Path | None, staging: Path) -> None:
    """Copy the tokenizer files into an artifact being written (contents, never links)."""
    for f in tokenizer_files(directory):
        shutil.copyfile(f, staging / f.name, follow_symlinks=True)


def load_tokenizer(directory: Path | None) -> Any:
    """The tokenizer saved beside the model (a fast tokenizer from tokenizer.json, or vocab)."""
    if not tokenizer_files(directory):
        raise WasiToolError(
            "this model has no tokenizer files (tokenizer.json, vocab.txt, ...); text data needs "
            "the tokenizer that was saved with the model"
        )
    tf = _transformers()
    try:
        return tf.AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:
        raise WasiToolError(f"cannot load the tokenizer in {directory}: {exc}") from None


def random_token_ids(
    model: nn.Module, batch: int, seq_len: int = DEFAULT_SEQ_LEN, gen: torch.Generator | None = None
) -> torch.Tensor:
    """(batch, seq_len) token ids that avoid the padding id, for checks and benchmarks."""
    config: Any = model.config
    vocab, pad = int(config.vocab_size), config.pad_token_id
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    if pad is not None:
        ids[ids == pad] = (int(pad) + 1) % vocab
    return ids


def context_length(model: nn.Module) -> tuple[int, str]:
    """The most tokens (prompt + generated) the model takes, and where that figure is from:
    its config's position limit, at most MAX_CONTEXT."""
    config: Any = getattr(model, "config", None)
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return min(value, MAX_CONTEXT), key
    return DEFAULT_CONTEXT, "the default: the config names no position limit"


def check_generation(
    model: nn.Module, prompt_tokens: int | None, max_new_tokens: int, temperature: float = 0.0,
    top_k: int | None = None, top_p: float | None = None,
) -> None:  # fmt: skip
    """Refuse generation settings out of range: non-finite or negative temperature, top_p
    outside (0, 1], and a prompt plus ``max_new_tokens`` beyond the model's context
    (``prompt_tokens`` None: the settings alone, before the prompt is tokenized)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise WasiToolError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise WasiToolError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise WasiToolError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise WasiToolError(f"top_k must be >= 1, got {top_k}")
    context, where = context_length(model)
    if prompt_tokens is None:
        if max_new_tokens >= context:
            raise WasiToolError(
                f"max_new_tokens {max_new_tokens} exceeds the model's context of {context} "
                f"tokens ({where}), prompt included"
            )
        return
    if prompt_tokens < 1:
        raise WasiToolError("the prompt is empty")
    if prompt_tokens >= context:
        raise WasiToolError(
            f"the prompt is {'more than ' if prompt_tokens > context else ''}{context} tokens: "
            f"the model's context is {context} ({where}), and it leaves no room to generate"
        )
    if prompt_tokens + max_new_tokens > context:
        raise WasiToolError(
            f"max_new_tokens {max_new_tokens} with a prompt of {prompt_tokens} tokens exceeds "
            f"the model's context of {context} tokens ({where}): at most "
            f"{context - prompt_tokens}"
        )


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> list[int]:
    """New token ids after ``prompt_ids`` from a causal LM, by transformers' ``generate`` with
    its key/value cache: greedy at ``temperature`` 0, else sampled (``top_k``, ``top_p``)
    with torch's RNG seeded by ``seed``. Stops at the end-of-sequence token. The prompt and
    ``max_new_tokens`` together must fit the model's context (``check_generation``). The model's
    modules run as they are (factored layers stay factored)."""
    if not is_causal_lm(model):
        raise WasiToolError("generation needs a causal language model (task causal-lm)")
    check_generation(model, len(prompt_ids), max_new_tokens, temperature, top_k, top_p)
    config: Any = model.config
    eos = config.eos_token_id
    was_training = model.training
    model.eval()
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    sample = temperature > 0
    options: dict[str, Any] = {"do_sample": sample}
    if sample:
        options.update(temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
        torch.manual_seed(seed)
    else:  # greedy; no sampling knobs (transformers warns about ignored ones)
        options.update(temperature=None, top_k=None, top_p=None)
    try:
        out = model.generate(  # type: ignore[operator]
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=config.pad_token_id if config.pad_token_id is not None else eos,
            use_cache=True,
            **options,
        )
    finally:
        model.train(was_training)
    new: list[int] = out[0, ids.shape[1] :].tolist()
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    while new and new[-1] in eos_ids:
        new.pop()
    return new
