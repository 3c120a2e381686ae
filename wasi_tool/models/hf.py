"""Hugging Face ``transformers`` text models from a local directory, offline.

A directory with a ``config.json`` (as ``save_pretrained`` writes it) is loaded as a sequence
classifier, ``AutoModelForSequenceClassification``: BERT-family encoders (BERT, MiniLM,
RoBERTa, DistilBERT, ...) and Llama-family decoders (Llama, Mistral, Qwen2, ...), whose
sequence-classification head scores the last non-padding token. Base-model weights (a
``BertModel`` or a ``LlamaForCausalLM`` checkpoint) load into it with a new, seeded head.

The model keeps the Hugging Face module names (``bert.encoder.layer.0.intermediate.dense``,
``model.layers.0.mlp.down_proj``), so target globs, artifacts and ``--merge`` exports use
them. Its class is the transformers class with a thin mixin in front: ``forward(input_ids)``
returns the logits tensor and derives the attention mask from the padding id, so the model
takes one (B, T) int64 tensor like a vision model takes images, and exports to ONNX with one
input ``input_ids`` (dynamic batch and sequence axes). Nothing is ever fetched from a hub:
``HF_HUB_OFFLINE`` is set and every load passes ``local_files_only``; remote code is refused.
"""

from __future__ import annotations

import os
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wasi_tool.errors import WasiToolError

HF_ARCH = "hf"
CONFIG = "config.json"
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
)
DEFAULT_SEQ_LEN = 16  # the sequence length of random check / bench inputs


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()  # "newly initialized head" is expected here
    transformers.utils.logging.disable_progress_bar()
    return transformers


def is_hf_dir(path: Path) -> bool:
    """A directory holding a transformers ``config.json`` (and not a wasi-tool artifact)."""
    return path.is_dir() and (path / CONFIG).is_file() and not (path / "manifest.json").exists()


def is_hf(model: nn.Module) -> bool:
    return isinstance(model, _LogitsMixin)


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


@cache
def _with_mixin(cls: type) -> type:
    return type(f"Wasi{cls.__name__}", (_LogitsMixin, cls), {"__module__": __name__})


def _seq_cls_class(config: Any) -> type:
    tf = _transformers()
    mapping = tf.AutoModelForSequenceClassification._model_mapping
    try:
        cls: type = mapping[type(config)]
    except KeyError:
        raise WasiToolError(
            f"transformers has no sequence-classification model for model_type "
            f"{getattr(config, 'model_type', '?')!r}"
        ) from None
    return cls


def _prepare_config(config: Any, num_classes: int | None) -> Any:
    if num_classes is not None:
        config.num_labels = num_classes
    if getattr(config, "pad_token_id", None) is None:
        # Decoder configs often have no padding id; the sequence head needs one to find the
        # last real token. End-of-sequence is the usual choice.
        eos = getattr(config, "eos_token_id", None)
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    config._attn_implementation = "eager"  # plain ops: exports to ONNX, same in train and eval
    config.use_cache = False
    return config


def _adopt(model: nn.Module) -> nn.Module:
    cls: Any = type(model)
    model.__class__ = _with_mixin(cls)
    return model.eval()


def read_config(directory: Path) -> Any:
    tf = _transformers()
    try:
        return tf.AutoConfig.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # unknown model_type, malformed JSON, remote code...
        raise WasiToolError(f"cannot read {directory / CONFIG}: {exc}") from None


def load_dir(directory: Path, num_classes: int | None, seed: int = 0) -> nn.Module:
    """The sequence classifier of a local transformers directory (new head seeded by ``seed``)."""
    if not any((directory / f).is_file() for f in WEIGHT_FILES):
        raise WasiToolError(
            f"{directory} has a {CONFIG} but no weights ({' or '.join(WEIGHT_FILES)})"
        )
    config = _prepare_config(read_config(directory), num_classes)
    cls = _seq_cls_class(config)
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
    return _adopt(model.float())


def build(kwargs: dict[str, Any]) -> nn.Module:
    """An uninitialised model from recorded ``model_kwargs`` (``hf_config``, ``num_classes``)."""
    tf = _transformers()
    try:
        raw = dict(kwargs["hf_config"])
        model_type = raw.pop("model_type")
        config = tf.AutoConfig.for_model(model_type, **raw)
    except Exception as exc:
        raise WasiToolError(f"malformed Hugging Face config in the artifact: {exc}") from None
    config = _prepare_config(config, kwargs.get("num_classes"))
    cls = _seq_cls_class(config)
    try:
        model = cls(config)
    except Exception as exc:
        raise WasiToolError(f"cannot build {cls.__name__} from the config: {exc}") from None
    return _adopt(model.float())


def model_kwargs(model: nn.Module) -> dict[str, Any]:
    """What ``build`` needs: the transformers config (JSON) and the class count."""
    hf_config: Any = model.config
    config = hf_config.to_dict()
    skip = ("transformers_version",)
    keep = {k: v for k, v in config.items() if not k.startswith("_") and k not in skip}
    return {"hf_config": keep, "num_classes": int(hf_config.num_labels)}


def tokenizer_files(directory: Path | None) -> list[Path]:
    if directory is None:
        return []
    return [directory / f for f in TOKENIZER_FILES if (directory / f).is_file()]


def copy_tokenizer(directory: Path | None, staging: Path) -> None:
    for f in tokenizer_files(directory):
        shutil.copyfile(f, staging / f.name)


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
