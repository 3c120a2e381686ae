"""What a model family knows, and the registry of families.

A ``ModelFamily`` answers every question the rest of the code asks about one family of models:
which architecture names and checkpoint paths it owns, how to build and rebuild a model, its
transformer blocks and which block a module name belongs to, its target presets, heads and
final norms, the input it takes (its preprocessing, an example batch, the ONNX input), which
of its blocks can drop tokens, and its task (classifier or causal LM).

Families are registered (``register_family``) and asked in order; the first that owns an
architecture name (``family_for_arch``), a checkpoint path (``family_for_path``) or a model
(``family_of``) answers. A family marked ``fallback`` answers for the models no other family
claims (plain PyTorch modules).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.models.suggest import suggest
from wasi_tool.nn import token_drop

DEFAULT_MEAN = (0.485, 0.456, 0.406)  # ImageNet, when a model records no normalisation
DEFAULT_STD = (0.229, 0.224, 0.225)
# Model constructor arguments wasi-tool records and passes back when it rebuilds a model.
MODEL_KWARGS = ("num_classes", "img_size")
# Architecture arguments a recipe may set to build a variant of an arch (e.g. a small ViT at
# 32 px with 4-px patches); they are recorded in every artifact so it can be rebuilt.
ARCH_KWARGS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


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


@dataclass(frozen=True)
class Task:
    """What a model is trained for. A classifier (``next_token`` False) gets a head fitted to
    the data's classes, one label per example, and is scored by accuracy per example; a causal
    LM (``next_token``) keeps its vocabulary head, its labels are the next tokens, and it is
    scored by perplexity and generation."""

    name: str
    next_token: bool

    @property
    def fits_head(self) -> bool:
        """A head is fitted to the data's classes (a causal LM keeps its vocabulary head)."""
        return not self.next_token

    def example_labels(self, x: torch.Tensor, num_classes: int, ignore: int) -> torch.Tensor:
        """Labels for a random input batch ``x`` (benchmarks): a random class per example, or
        for a causal LM the next tokens (``x`` shifted by one, ``ignore`` at the end)."""
        if self.next_token:
            return torch.cat([x[:, 1:], torch.full_like(x[:, :1], ignore)], dim=1)
        return torch.randint(0, num_classes, (x.shape[0],))

    def __str__(self) -> str:
        return self.name


CLASSIFIER = Task("classifier", next_token=False)
CAUSAL_LM = Task("causal-lm", next_token=True)


@dataclass
class PathModel:
    """A model a family read from a checkpoint path it owns: the model, its arch and rebuild
    kwargs, the file its weights came from (``weights``; None for a random init from
    ``config``), the source ``kind`` and the tokenizer directory."""

    model: nn.Module
    arch: str
    model_kwargs: dict[str, object]
    kind: str
    weights: Path | None = None
    config: Path | None = None
    directory: Path | None = None
    tokenizer_dir: Path | None = None


# "encoder_layer_3" (torchvision), "layer.3", "blocks.11": a numbered part of a module name
_NUMBERED = re.compile(r"^[A-Za-z]+(_[A-Za-z]+)*_\d+$")
WINDOWED = (
    "windowed attention (Swin) has no CLS token and needs the full token grid; "
    "Swin supports block selection only"
)


def numbered_block(name: str) -> str | None:
    """The block a module name belongs to by the common convention of numbered module lists:
    its name up to the first numeric part (``bert.encoder.layer.3`` for
    ``bert.encoder.layer.3.output.dense``; ``blocks.11``; torchvision's
    ``encoder.layers.encoder_layer_3``). What ``ModelFamily.block_of`` answers unless a family
    names its blocks otherwise, and what a report without a model (plots) goes by."""
    parts = name.split(".")
    for k, part in enumerate(parts):
        if part.isdigit() or _NUMBERED.match(part):
            return ".".join(parts[: k + 1])
    return None


def classifier_names(model: nn.Module) -> set[str]:
    """Module names of the model's classifier head(s) (timm's ``get_classifier``)."""
    getter = getattr(model, "get_classifier", None)
    if getter is None:
        return set()
    heads = getter()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    ids = {id(h) for h in heads if isinstance(h, nn.Module)}
    return {name for name, mod in model.named_modules() if id(mod) in ids and name}


def has_params(model: nn.Module, name: str) -> bool:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return False
    return any(True for _ in module.parameters())


def module_list(model: nn.Module, path: str) -> nn.Sequential | nn.ModuleList | None:
    try:
        found = model.get_submodule(path)
    except AttributeError:
        return None
    return found if isinstance(found, (nn.Sequential, nn.ModuleList)) and len(found) else None


def is_windowed(block: nn.Module) -> bool:
    """A Swin block (timm's or torchvision's): windowed attention with relative positions."""
    attn = getattr(block, "attn", None)
    return hasattr(attn, "window_size") and hasattr(attn, "relative_position_bias_table")


# What a family answers about one block and token dropping: the TokenDropBlock class to wrap
# it in, or why it cannot drop tokens.
TokenDropAnswer = type[token_drop.TokenDropBlock] | str


class ModelFamily:
    """A family of models; subclasses override what differs (see the module doc)."""

    name: ClassVar[str] = "base"
    # answers for every model no other family claims (asked after all the others)
    fallback: ClassVar[bool] = False
    # its inputs are text through a tokenizer (check inputs, data come from wasi_tool.data.text)
    reads_text: ClassVar[bool] = False
    # the tasks a caller may ask for when loading (ModelSource.task); () for a fixed task
    tasks: ClassVar[tuple[str, ...]] = ()
    # where its blocks are, for messages ("`blocks` (ViT)")
    block_layout: ClassVar[str] = ""
    presets: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    final_norms: ClassVar[tuple[str, ...]] = ()
    # the attention and MLP halves of a block, by child name (first found)
    attn_children: ClassVar[tuple[str, ...]] = ("attn",)
    mlp_children: ClassVar[tuple[str, ...]] = ("mlp",)

    # -- architecture names and checkpoints ------------------------------------------------

    def owns_arch(self, arch: str) -> bool:
        """``arch`` is one of this family's architecture names."""
        return False

    def owns_path(self, path: Path) -> bool:
        """``path`` is a checkpoint this family reads itself (``load_path``)."""
        return False

    def arch_names(self) -> Iterable[str]:
        """The architecture names it knows (for 'did you mean')."""
        return ()

    def spelled(self, arch: str) -> str | None:
        """The name this family knows ``arch`` by, when ``arch`` misses only its spelling
        (torchvision: ``vit_b_16`` -> ``torchvision:vit_b_16``)."""
        return None

    def load_path(
        self,
        path: Path,
        *,
        task: str | None,
        num_classes: int | None,
        seed: int,
        random_init: bool,
    ) -> PathModel:
        """The model of a checkpoint ``path`` this family owns (``owns_path``)."""
        raise WasiToolError(f"{self.name} models are not read from {path}")

    def check_arch(self, arch: str) -> None:
        """Raise WasiToolError naming close names when ``arch`` is not buildable."""

    def build(self, arch: str, **kwargs: Any) -> nn.Module:
        """A randomly initialised model of ``arch`` in eval mode (``kwargs``: MODEL_KWARGS and
        ARCH_KWARGS, None values ignored). Never downloads anything."""
        raise WasiToolError(f"{self.name} models cannot be built by name ({arch})")

    def check_rebuild(self, kwargs: Mapping[str, Any], model_class: str | None, where: str) -> None:
        """Refuse to rebuild from recorded ``kwargs`` what the caller did not allow (a custom
        model's class runs code: the caller must name it)."""

    def rebuild(self, arch: str, kwargs: Mapping[str, Any]) -> nn.Module:
        """The model of recorded ``model_kwargs`` (an artifact's), values uninitialised or
        random: the weights are loaded next."""
        return self.build(arch, **kwargs)

    def after_load_(self, model: nn.Module) -> None:
        """Fix up a model after its weights were assigned (re-tie shared weights)."""

    def default_classifier(self, arch: str) -> str | None:
        """The classifier's module name of ``arch`` (e.g. ``head``), if known."""
        return None

    def image_size_of(self, arch: str, state: Mapping[str, Any]) -> int | None:
        """The image size a state dict of ``arch`` was trained at, when it is not the arch's
        default and the weights say it (a position embedding's length)."""
        return None

    # -- models ------------------------------------------------------------------------------

    def matches(self, model: nn.Module) -> bool:
        return False

    def recorded_arch(self, model: nn.Module) -> str | None:
        """The architecture name ``model`` records about itself, if any."""
        return None

    def task(self, model: nn.Module) -> Task:
        """What the model is trained for (``CLASSIFIER`` or ``CAUSAL_LM``)."""
        return CLASSIFIER

    def blocks(self, model: nn.Module) -> list[str]:
        """Names of the transformer blocks in execution order ([] if none are known)."""
        return []

    def block_of(self, name: str) -> str | None:
        """The block module name ``name`` belongs to (None: outside every block)."""
        return numbered_block(name)

    def preset(self, name: str) -> tuple[str, ...] | None:
        """The module-name globs of target preset ``name`` for this family's models (``all``:
        every linear); None when ``name`` is no preset (it is a glob then)."""
        if name == "all":
            return ("*",)
        return self.presets.get(name)

    def preset_names(self) -> list[str]:
        return [*self.presets, "all"]

    def heads(self, model: nn.Module) -> set[str]:
        """Module names of the classifier head(s)."""
        return classifier_names(model)

    def norms(self, model: nn.Module) -> list[str]:
        """The final norm(s) that this model has (and that hold parameters)."""
        return [n for n in self.final_norms if has_params(model, n)]

    def regions(self, model: nn.Module, granularity: str) -> list[str]:
        """The modules to recompute at ``granularity``: whole ``block``s, or each block's
        ``mlp`` or ``attn`` half (blocks without that child are skipped)."""
        blocks = self.blocks(model)
        if granularity == "block":
            return blocks
        children = {"mlp": self.mlp_children, "attn": self.attn_children}[granularity]
        found = []
        for block in blocks:
            names = [c for c in children if has_params(model, f"{block}.{c}")]
            found += [f"{block}.{c}" for c in names[:1]]
        return found

    def input_spec(self, model: nn.Module, model_kwargs: Mapping[str, Any]) -> InputSpec:
        raise NotImplementedError

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

    def token_drop_block(self, model: nn.Module, block: nn.Module) -> TokenDropAnswer:
        """The ``TokenDropBlock`` class that makes ``block`` drop tokens, or why it cannot."""
        return f"{self.name} models do not drop tokens"


_FAMILIES: list[ModelFamily] = []


def register_family(family: ModelFamily, *, before: str | None = None) -> ModelFamily:
    """Add ``family`` to the registry, at the end or just before the family named ``before``
    (it is asked first then). Names are unique."""
    if not family.name or family.name == ModelFamily.name:
        raise ValueError("a model family needs a name of its own")
    if any(f.name == family.name for f in _FAMILIES):
        raise ValueError(f"model family {family.name!r} is already registered")
    if before is None:
        _FAMILIES.append(family)
        return family
    for i, f in enumerate(_FAMILIES):
        if f.name == before:
            _FAMILIES.insert(i, family)
            return family
    raise ValueError(f"no model family {before!r} to register {family.name!r} before")


def unregister_family(name: str) -> None:
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != name]


def families() -> tuple[ModelFamily, ...]:
    """The registered families in the order they are asked (fallbacks last)."""
    return (
        *(f for f in _FAMILIES if not f.fallback),
        *(f for f in _FAMILIES if f.fallback),
    )


def get_family(name: str) -> ModelFamily:
    for family in _FAMILIES:
        if family.name == name:
            return family
    raise WasiToolError(
        f"unknown model family {name!r}; known: {', '.join(f.name for f in _FAMILIES)}"
    )


def family_of(model: nn.Module) -> ModelFamily:
    """The family of ``model``: the first that claims it."""
    for family in families():
        if family.matches(model):
            return family
    raise WasiToolError(f"no model family knows {type(model).__name__}")


def task_of(model: nn.Module) -> Task:
    """``CLASSIFIER`` or ``CAUSAL_LM``: what ``model``'s family says it is trained for."""
    return family_of(model).task(model)


def family_for_arch(arch: str | None) -> ModelFamily | None:
    """The family that owns architecture name ``arch`` (None: no family knows it)."""
    if arch is None:
        return None
    return next((f for f in families() if f.owns_arch(arch)), None)


def family_for_path(path: Path) -> ModelFamily | None:
    """The family that reads checkpoint ``path`` itself (a Hugging Face directory, a .gguf);
    None for the files loading reads alike for every family (state dicts, artifacts)."""
    return next((f for f in families() if f.owns_path(path)), None)


def arch_family(arch: str) -> ModelFamily:
    """The family of ``arch``; a WasiToolError naming close names when no family knows it."""
    family = family_for_arch(arch)
    if family is not None:
        return family
    for other in families():
        alt = other.spelled(arch)
        if alt is not None:
            raise WasiToolError(f"unknown architecture {arch!r}; did you mean {alt}?")
    names = [n for f in families() for n in f.arch_names()]
    close = suggest(arch, names)
    hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
    raise WasiToolError(f"unknown architecture {arch!r}{hint}")


def all_presets() -> dict[str, tuple[str, ...]]:
    """Every family's presets merged (what a model no family claims is matched against)."""
    merged: dict[str, tuple[str, ...]] = {}
    for family in families():
        for key, patterns in family.presets.items():
            merged[key] = tuple(dict.fromkeys((*merged.get(key, ()), *patterns)))
    merged["all"] = ("*",)
    return merged


def token_drop_refusal(model: nn.Module, block: nn.Module) -> str | None:
    """Why ``block`` of ``model`` cannot drop tokens, or None when it can."""
    found = family_of(model).token_drop_block(model, block)
    return found if isinstance(found, str) else None


def enable_token_drop_(model: nn.Module, spec: Mapping[str, tuple[float, bool]]) -> None:
    """Make the named blocks drop tokens: ``{block name: (keep_rate, fuse)}``; the model's
    family says how each block drops them (or why it cannot)."""
    family = family_of(model)
    kind: Callable[[nn.Module], TokenDropAnswer] = lambda b: family.token_drop_block(model, b)  # noqa: E731
    token_drop.enable_token_drop_(model, spec, kind)
