"""What wasi-tool knows about a family of models, in one adapter per family.

A ``ModelFamily`` answers every model-specific question the rest of the code asks: the
transformer blocks in execution order, the final norms and classifier heads, the target
presets, the input the model takes (its preprocessing and an example batch) and the ONNX
input name. Adding a family is one subclass here plus one entry in ``FAMILIES``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.models import custom, hf, tv
from wasi_tool.models.registry import classifier_names

DEFAULT_MEAN = (0.485, 0.456, 0.406)  # ImageNet, when a model records no normalisation
DEFAULT_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """What a model takes: ``images`` (B, 3, size, size) normalised by mean/std, or
    ``tokens`` (B, T) int64 ids (``size`` is then the default random sequence length).
    ``resize``: images are first resized (shorter side, ``interpolation``) to it and then
    center-cropped to ``size`` (torchvision's ImageNet eval transform); None: resized to
    ``size`` directly."""

    kind: str
    size: int
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    onnx_input: str = "pixel_values"
    dynamic_axes: tuple[str, ...] = ("batch",)
    resize: int | None = None
    interpolation: str = "bilinear"


CLASSIFIER = "classifier"
CAUSAL_LM = "causal-lm"


class ModelFamily:
    """Base adapter; subclasses override what differs."""

    name: ClassVar[str] = "base"
    # its inputs are text through a tokenizer (check inputs, data come from wasi_tool.data.text)
    reads_text: ClassVar[bool] = False
    presets: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    final_norms: ClassVar[tuple[str, ...]] = ()

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def task(self, model: nn.Module) -> str:
        """What the model is trained for: ``CLASSIFIER`` (a head fitted to the data's classes)
        or ``CAUSAL_LM`` (next-token prediction; its vocabulary head is kept)."""
        return CLASSIFIER

    def blocks(self, model: nn.Module) -> list[str]:
        """Names of the transformer blocks in execution order ([] if none are known)."""
        return []

    def heads(self, model: nn.Module) -> set[str]:
        """Module names of the classifier head(s)."""
        return classifier_names(model)

    def norms(self, model: nn.Module) -> list[str]:
        """The final norm(s) that this model has (and that hold parameters)."""
        return [n for n in self.final_norms if _has_params(model, n)]

    def input_spec(self, model: nn.Module, model_kwargs: Mapping[str, Any]) -> InputSpec:
        raise NotImplementedError

    # the attention and MLP halves of a block, by child name (first found)
    attn_children: ClassVar[tuple[str, ...]] = ("attn",)
    mlp_children: ClassVar[tuple[str, ...]] = ("mlp",)

    def regions(self, model: nn.Module, granularity: str) -> list[str]:
        """The modules to recompute at ``granularity``: whole ``block``s, or each block's
        ``mlp`` or ``attn`` half (blocks without that child are skipped)."""
        blocks = self.blocks(model)
        if granularity == "block":
            return blocks
        children = {"mlp": self.mlp_children, "attn": self.attn_children}[granularity]
        found = []
        for block in blocks:
            names = [c for c in children if _has_params(model, f"{block}.{c}")]
            found += [f"{block}.{c}" for c in names[:1]]
        return found

    def example_input(
        self,
        model: nn.Module,
        spec: InputSpec,
        batch: int,
        seq_len: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """A random input batch of the model's kind (checks, benchmarks, exports)."""
        return torch.randn(batch, 3, spec.size, spec.size, generator=generator)


def _has_params(model: nn.Module, name: str) -> bool:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return False
    return any(True for _ in module.parameters())


def _module_list(model: nn.Module, path: str) -> nn.Sequential | nn.ModuleList | None:
    try:
        found = model.get_submodule(path)
    except AttributeError:
        return None
    return found if isinstance(found, (nn.Sequential, nn.ModuleList)) and len(found) else None


class TimmVision(ModelFamily):
    """timm vision transformers: ViT/DeiT (``blocks.i``), Swin (``layers.i.blocks.j``)."""

    name = "timm"
    presets: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "mlp": ("*mlp.fc1", "*mlp.fc1_g", "*mlp.fc1_x", "*mlp.fc2"),
        "attn": ("*attn.qkv", "*attn.q", "*attn.kv", "*attn.k", "*attn.v", "*attn.proj"),
    }
    final_norms = ("norm", "fc_norm", "head.norm")

    def matches(self, model: nn.Module) -> bool:
        return not hf.is_hf(model) and not tv.is_tv(model)

    def blocks(self, model: nn.Module) -> list[str]:
        blocks = _module_list(model, "blocks")
        if blocks is not None:
            return [f"blocks.{i}" for i in range(len(blocks))]
        layers = _module_list(model, "layers")
        if layers is None:
            return []
        return [
            f"layers.{i}.blocks.{j}"
            for i, layer in enumerate(layers)
            for j in range(len(getattr(layer, "blocks", ())))
        ]

    def input_spec(self, model: nn.Module, model_kwargs: Mapping[str, Any]) -> InputSpec:
        """timm's own data config (mean, std), at the size the model was built for."""
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(model)
        size = model_kwargs.get("img_size")
        if size is None:
            img = getattr(getattr(model, "patch_embed", None), "img_size", None)
            if img is not None:
                size = img[0] if isinstance(img, (tuple, list)) else img
        if size is None:
            size = cfg["input_size"][-1]
        return InputSpec(
            "images", int(size), tuple(cfg.get("mean", DEFAULT_MEAN)), tuple(cfg["std"])
        )


class HFText(ModelFamily):
    """Hugging Face text models (BERT family, Llama family) loaded as sequence classifiers."""

    name = "hf"
    reads_text = True
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

    def matches(self, model: nn.Module) -> bool:
        return hf.is_hf(model)

    def task(self, model: nn.Module) -> str:
        return CAUSAL_LM if hf.is_causal_lm(model) else CLASSIFIER

    def blocks(self, model: nn.Module) -> list[str]:
        for path in self.block_lists:
            found = _module_list(model, path)
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


class TorchvisionVision(ModelFamily):
    """torchvision's ViT (``encoder.layers.encoder_layer_i``) and Swin (``features.s.j``), as
    models/tv.py builds them (ViT's attention a ``SelfAttention`` with an ``in_proj`` linear,
    Swin's a ``WindowAttention`` calling its ``qkv``/``proj`` modules)."""

    name = "torchvision"
    presets: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "mlp": (
            *("encoder.layers.encoder_layer_*.mlp.0", "encoder.layers.encoder_layer_*.mlp.3"),
            *("features.*.mlp.0", "features.*.mlp.3"),
        ),
        "attn": (
            "encoder.layers.encoder_layer_*.self_attention.in_proj",
            "encoder.layers.encoder_layer_*.self_attention.out_proj",
            *("features.*.attn.qkv", "features.*.attn.proj"),
        ),
    }
    final_norms = ("encoder.ln", "norm")
    attn_children = ("self_attention", "attn")
    mlp_children = ("mlp",)

    def matches(self, model: nn.Module) -> bool:
        return tv.is_tv(model)

    def blocks(self, model: nn.Module) -> list[str]:
        layers = _module_list(model, "encoder.layers")
        if layers is not None:  # ViT
            return [f"encoder.layers.{name}" for name, _ in layers.named_children()]
        features = _module_list(model, "features")
        if features is None:
            return []
        return [  # Swin: the stages are Sequentials of blocks (patch merging in between)
            f"features.{i}.{j}"
            for i, stage in enumerate(features)
            if isinstance(stage, nn.Sequential) and hasattr(stage[0], "attn")
            for j in range(len(stage))
        ]

    def input_spec(self, model: nn.Module, model_kwargs: Mapping[str, Any]) -> InputSpec:
        """torchvision's ImageNet eval transform of the arch's weights (resize, center crop,
        mean, std), scaled when the model was built for another size."""
        arch = getattr(model, "wasi_arch", None)
        pre = tv.preprocessing(arch) if isinstance(arch, str) else None
        crop = pre["crop"] if pre else 224
        size = model_kwargs.get("img_size") or tv.vit_image_size(model) or crop
        size = int(size)
        if pre is None:
            return InputSpec("images", size)
        resize = round(pre["resize"] * size / crop)
        return InputSpec(
            "images",
            size,
            pre["mean"],
            pre["std"],
            resize=resize,
            interpolation=pre["interpolation"],
        )


class TorchCustom(TimmVision):
    """The user's own model (saved by ``wasi_tool.save_artifact``): its input is the recorded
    example input's shape; blocks are the layers of its ``nn.TransformerEncoder``s/Decoders;
    ``mlp`` means their ``linear1``/``linear2`` (PyTorch's names)."""

    name = "custom"
    presets: ClassVar[Mapping[str, tuple[str, ...]]] = {"mlp": ("*linear1", "*linear2")}
    attn_children = ("self_attn",)
    mlp_children = ()

    def matches(self, model: nn.Module) -> bool:
        return custom.custom_kwargs(model) is not None

    def blocks(self, model: nn.Module) -> list[str]:
        kinds = (nn.TransformerEncoder, nn.TransformerDecoder)
        return [
            f"{name}.layers.{i}" if name else f"layers.{i}"
            for name, m in model.named_modules()
            if isinstance(m, kinds)
            for i in range(len(m.layers))
        ] or super().blocks(model)

    def input_spec(self, model: nn.Module, model_kwargs: Mapping[str, Any]) -> InputSpec:
        kw = custom.custom_kwargs(model) or dict(model_kwargs)
        shape = kw["input_shape"]
        images = len(shape) == 4 and str(kw.get("input_dtype", "float32")).startswith("float")
        return InputSpec("images" if images else "tensor", int(shape[-1]), onnx_input="input")

    def example_input(
        self,
        model: nn.Module,
        spec: InputSpec,
        batch: int,
        seq_len: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        kw = custom.custom_kwargs(model)
        assert kw is not None
        return custom.example_like(kw, batch, generator)


# disjoint: the custom family first (marked models only), then each matches its own
FAMILIES: list[ModelFamily] = [TorchCustom(), TorchvisionVision(), TimmVision(), HFText()]


def family_of(model: nn.Module) -> ModelFamily:
    """The adapter of ``model``'s family (the first that matches)."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    raise WasiToolError(f"no model family knows {type(model).__name__}")


def task_of(model: nn.Module) -> str:
    """``CLASSIFIER`` or ``CAUSAL_LM``: what ``model``'s family says it is trained for."""
    return family_of(model).task(model)


def all_presets() -> dict[str, tuple[str, ...]]:
    """Every family's presets merged (``mlp`` matches timm and Hugging Face names alike)."""
    merged: dict[str, tuple[str, ...]] = {}
    for family in FAMILIES:
        for key, patterns in family.presets.items():
            merged[key] = (*merged.get(key, ()), *patterns)
    merged["all"] = ("*",)
    return merged
