"""Hugging Face ``transformers`` text models (models/hf.py): BERT-family encoders and
Llama-family decoders, as sequence classifiers or causal LMs, from a local directory or a
``.gguf`` file (arch ``hf``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.models import hf
from wasi_tool.models.families.base import (
    CAUSAL_LM,
    CLASSIFIER,
    InputSpec,
    ModelFamily,
    PathModel,
    Task,
    TokenDropAnswer,
    module_list,
)


class HFFamily(ModelFamily):
    """Hugging Face text models (BERT family, Llama family), classifiers or causal LMs."""

    name = "hf"
    reads_text = True
    tasks = hf.TASKS
    block_layout = "a Hugging Face layer list (`bert.encoder.layer`, `model.layers`, ...)"
    # Block outputs of BERT-family encoders: "layer.<n>.output.dense", not the attention's
    # "layer.<n>.attention.output.dense" (a "*" would span the dots).
    presets: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "mlp": (
            "*intermediate.dense",
            *("*layer.[0-9].output.dense", "*layer.[0-9][0-9].output.dense"),
            *("*ffn.lin1", "*ffn.lin2"),
            *("*mlp.gate_proj", "*mlp.up_proj", "*mlp.down_proj"),
        ),
        "attn": (
            *("*attention.self.query", "*attention.self.key", "*attention.self.value"),
            "*attention.output.dense",
            *("*attention.q_lin", "*attention.k_lin", "*attention.v_lin", "*attention.out_lin"),
            *("*self_attn.q_proj", "*self_attn.k_proj", "*self_attn.v_proj", "*self_attn.o_proj"),
        ),
    }
    final_norms = ("model.norm", "bert.pooler")
    attn_children = ("self_attn", "attention")
    mlp_children = ("mlp", "ffn")
    block_lists: ClassVar[tuple[str, ...]] = (
        "bert.encoder.layer",
        "model.layers",
        "distilbert.transformer.layer",
    )

    def owns_arch(self, arch: str) -> bool:
        return arch == hf.HF_ARCH

    def owns_path(self, path: Path) -> bool:
        """A transformers directory (``config.json``) or a ``.gguf`` file."""
        return hf.is_hf_dir(path) or (path.is_file() and hf.is_gguf(path))

    def build(self, arch: str, **kwargs: Any) -> nn.Module:
        raise WasiToolError("--arch hf needs a model directory with a config.json")

    def rebuild(self, arch: str, kwargs: Mapping[str, Any]) -> nn.Module:
        return hf.build(kwargs)

    def after_load_(self, model: nn.Module) -> None:
        hf.retie_(model)

    def load_path(
        self,
        path: Path,
        *,
        task: str | None,
        num_classes: int | None,
        seed: int,
        random_init: bool,
    ) -> PathModel:
        """The model of a transformers directory (its weights; with ``random_init`` only its
        config's shapes) or of a ``.gguf`` file."""
        hf.check_task(task)
        if random_init:
            if not hf.is_hf_dir(path):
                raise WasiToolError("give either a checkpoint or --random-init, not both")
            model = hf.random_dir(path, task, seed)
            tokenizer_dir = path if hf.tokenizer_files(path) else None
            return PathModel(
                model, hf.HF_ARCH, hf.model_kwargs(model), "random-init",
                config=path / hf.CONFIG, tokenizer_dir=tokenizer_dir,
            )  # fmt: skip
        if path.is_file() and hf.is_gguf(path):
            model, tokenizer_dir = hf.load_gguf(path, task)
            return PathModel(
                model, hf.HF_ARCH, hf.model_kwargs(model), "gguf", weights=path,
                tokenizer_dir=tokenizer_dir,
            )  # fmt: skip
        directory = path if path.is_dir() else path.parent
        model = hf.load_dir(directory, num_classes, seed, task)
        weights = next(directory / f for f in hf.WEIGHT_FILES if (directory / f).is_file())
        return PathModel(
            model, hf.HF_ARCH, hf.model_kwargs(model), "hf-dir", weights=weights,
            directory=directory, tokenizer_dir=directory,
        )  # fmt: skip

    def matches(self, model: nn.Module) -> bool:
        return hf.is_hf(model)

    def task(self, model: nn.Module) -> Task:
        return CAUSAL_LM if hf.is_causal_lm(model) else CLASSIFIER

    def blocks(self, model: nn.Module) -> list[str]:
        for path in self.block_lists:
            found = module_list(model, path)
            if found is not None:
                return [f"{path}.{i}" for i in range(len(found))]
        return []

    def input_spec(self, model: nn.Module, model_kwargs: Mapping[str, Any]) -> InputSpec:
        return InputSpec(
            "tokens", hf.DEFAULT_SEQ_LEN, onnx_input="input_ids", dynamic_axes=("batch", "seq")
        )

    def example_input(
        self,
        model: nn.Module,
        spec: InputSpec,
        batch: int,
        seq_len: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return hf.random_token_ids(model, batch, seq_len or spec.size, generator)

    def token_drop_block(self, model: nn.Module, block: nn.Module) -> TokenDropAnswer:
        return "the model has no CLS token"
