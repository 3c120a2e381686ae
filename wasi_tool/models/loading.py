"""Loading a model from a checkpoint, a wasi-tool artifact, or a random init; all offline.

Code in a checkpoint never runs unless the caller sets ``trust_pickle``: ``.pt``/``.pth``
files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from wasi_tool import artifact
from wasi_tool.artifact import FactoredShape, SourceDict, StageRecord, WeightsMetadata
from wasi_tool.errors import WasiToolError
from wasi_tool.models import hf
from wasi_tool.models.families import (
    ModelFamily,
    arch_family,
    enable_token_drop_,
    families,
    family_for_arch,
    family_for_path,
    family_of,
)
from wasi_tool.models.families.base import ARCH_KWARGS
from wasi_tool.models.registry import build_model
from wasi_tool.nn.factored import FactoredLinear
from wasi_tool.nn.swap import set_submodule
from wasi_tool.nn.token_drop import token_drop_spec

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
CHUNK = 1 << 20  # elements per finiteness check


@dataclass
class ModelSource:
    """Where a model comes from: the loading flags shared by every command."""

    checkpoint: Path | None = None
    arch: str | None = None
    num_classes: int | None = None
    img_size: int | None = None
    trust_pickle: bool = False
    random_init: bool = False
    seed: int = 0
    model_kwargs: dict[str, Any] | None = None  # ARCH_KWARGS, e.g. {"patch_size": 4}
    task: str | None = None  # Hugging Face models: causal-lm or classify (default: by checkpoint)
    model_class: str | None = None  # pkg.mod:Class, to rebuild a custom model's artifact


@dataclass
class LoadedModel:
    """A model in eval mode plus what is needed to rebuild it and to say where it came from."""

    model: nn.Module
    arch: str | None
    model_kwargs: dict[str, Any]
    source: SourceDict
    stages: list[StageRecord] = field(default_factory=list)
    tokenizer_dir: Path | None = None  # Hugging Face models: where the tokenizer files are


def load_model(src: ModelSource) -> LoadedModel:
    """Load the model ``src`` describes; every failure is a WasiToolError. The weights are
    validated whatever their source (see ``check_weights``)."""
    loaded = _load_model(src)
    family = family_for_arch(loaded.arch)
    if src.task is not None and (family is None or src.task not in family.tasks):
        where = src.checkpoint or "--random-init"
        what = ", not a causal language model" if src.task == hf.CAUSAL_LM else ""
        raise WasiToolError(
            f"{where} is a {loaded.arch} image model{what}: task {src.task} is for Hugging "
            "Face models (a directory or a .gguf file)"
        )
    check_weights(loaded.model, loaded.source.get("path") or "the model")
    return loaded


def check_weights(model: nn.Module, where: str) -> None:
    """Refuse weights a float model cannot train from: a parameter that is not floating point
    (int8 or bool from a quantised or corrupt checkpoint; assigning it would make the model
    compute in integers) and any non-finite value in a parameter or floating buffer. One
    ``isfinite`` pass per tensor, in chunks of 1M elements (a 1 MB mask at most: the check
    must not raise the load's peak, which the memory planner counts)."""
    for name, param in model.named_parameters():
        if not (param.dtype.is_floating_point or param.dtype.is_complex):
            _not_float(name, param.dtype, where)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if tensor.is_meta or not tensor.dtype.is_floating_point:
            continue
        with torch.no_grad():
            flat = tensor.detach().reshape(-1)
            bad = sum(
                int((~torch.isfinite(flat[i : i + CHUNK])).sum())
                for i in range(0, flat.numel(), CHUNK)
                if not bool(torch.isfinite(flat[i : i + CHUNK]).all())
            )
        if bad:
            raise WasiToolError(
                f"{where}: {name} holds {bad} non-finite value{'s' if bad > 1 else ''} "
                "(NaN or inf); refusing weights that cannot train"
            )


def _load_model(src: ModelSource) -> LoadedModel:
    if src.num_classes is not None and src.num_classes < 1:
        raise WasiToolError(f"num_classes must be >= 1, got {src.num_classes}")
    if src.img_size is not None and src.img_size < 1:
        raise WasiToolError(f"img_size must be >= 1, got {src.img_size}")
    if not 0 <= int(src.seed) < 2**63:
        raise WasiToolError(f"seed must be in 0..2**63-1, got {src.seed}")
    extra = src.model_kwargs or {}
    bad = sorted(set(extra) - set(ARCH_KWARGS)) if isinstance(extra, dict) else ["model_kwargs"]
    if bad:
        raise WasiToolError(f"unsupported model_kwargs {bad}; allowed: {', '.join(ARCH_KWARGS)}")
    owner = family_for_path(Path(src.checkpoint)) if src.checkpoint is not None else None
    if src.random_init and owner is not None:  # a model directory's config: its shapes
        return _from_owned_path(owner, Path(src.checkpoint or ""), src)
    if src.random_init:
        return _random_init(src)
    if src.checkpoint is None:
        raise WasiToolError("no checkpoint given (or pass --random-init with --arch)")
    path = Path(src.checkpoint)
    if not path.exists():
        raise WasiToolError(f"no such file or directory: {path}")
    if not path.is_file() and not path.is_dir():  # a FIFO or a device would block or stream
        raise WasiToolError(f"{path} is not a regular file or a directory")
    _check_task(src.task)
    if owner is not None:  # a Hugging Face directory or .gguf file
        return _from_owned_path(owner, path, src)
    named = family_for_arch(src.arch)
    if named is not None and named.owns_path(path.parent):  # a file of a model directory
        return _from_owned_path(named, path.parent, src)
    if path.is_dir():
        if not artifact.is_artifact_dir(path):
            raise WasiToolError(
                f"{path} is a directory but not a wasi-tool artifact (no manifest.json) nor a "
                "Hugging Face model (no config.json)"
            )
        return load_artifact(path, expect_arch=src.arch, model_class=src.model_class)
    if path.suffix == ".safetensors":
        tensors, meta = artifact.load_weights(path)
        if WeightsMetadata.is_wasi(meta):
            return _from_wasi_weights(path, tensors, meta, src.arch, src.model_class)
        arch = src.arch or meta.get("arch")
        return _from_state_dict(tensors, arch, src, _source(path, "safetensors"))
    if path.suffix in TORCH_SUFFIXES:
        return _from_torch_file(path, src)
    raise WasiToolError(
        f"unsupported checkpoint {path.name}: expected .safetensors, "
        f"{'/'.join(TORCH_SUFFIXES)}, .gguf, a Hugging Face directory or a wasi-tool artifact "
        "directory"
    )


def load_artifact(
    directory: Path, expect_arch: str | None = None, model_class: str | None = None
) -> LoadedModel:
    """Rebuild the model of a wasi-tool artifact directory (its weights are hash-checked);
    a custom model only when ``model_class`` names the class it records."""
    manifest = artifact.load_manifest(directory)
    for name in manifest.files:  # every file it lists is there (the weights also hashed)
        if not artifact.safe_member(directory, name).is_file():
            raise WasiToolError(f"artifact {directory} is missing {name}, which its manifest lists")
    artifact.verify_files(directory, manifest, [artifact.WEIGHTS])
    weights = directory / artifact.WEIGHTS
    tensors, meta = artifact.load_weights(weights)
    loaded = _from_wasi_weights(weights, tensors, meta, expect_arch, model_class)
    loaded.source = {
        **manifest.source,
        "parent": {
            "path": str(directory),
            "sha256": manifest.files[artifact.WEIGHTS]["sha256"],
        },
    }
    loaded.stages = list(manifest.stages)
    if hf.tokenizer_files(directory):
        loaded.tokenizer_dir = directory
    return loaded


def weights_metadata(loaded: LoadedModel) -> WeightsMetadata:
    """The safetensors ``__metadata__`` that lets ``load_model`` rebuild ``loaded.model``
    (with ``loaded.stages``, its history)."""
    if loaded.arch is None:
        raise WasiToolError(
            "cannot write an artifact: the model has no timm architecture name (pass --arch)"
        )
    factored = {
        name: FactoredShape(m.out_features, m.in_features, m.rank, m.bias is not None)
        for name, m in loaded.model.named_modules()
        if isinstance(m, FactoredLinear)
    }
    token_drop = {  # part of the model: BSR's blocks that drop tokens
        name: (float(spec[0]), bool(spec[1]))
        for name, spec in token_drop_spec(loaded.model).items()
    }
    return WeightsMetadata(
        loaded.arch, loaded.model_kwargs, factored, token_drop, list(loaded.stages)
    )


def _source(path: Path, kind: str) -> SourceDict:
    return {"kind": kind, "path": str(path), "sha256": artifact.sha256_file(path)}


def _check_task(task: str | None) -> None:
    known = [t for f in families() for t in f.tasks]
    if task is not None and task not in known:
        raise WasiToolError(f"task must be one of {', '.join(known)}, got {task!r}")


def _from_owned_path(family: ModelFamily, path: Path, src: ModelSource) -> LoadedModel:
    """The model of a checkpoint path its family reads itself (a Hugging Face directory, a
    .gguf file; with ``--random-init``, a directory's config alone)."""
    got = family.load_path(
        path,
        task=src.task,
        num_classes=src.num_classes,
        seed=src.seed,
        random_init=src.random_init,
    )
    if got.weights is None:  # a random init: the config it was drawn from
        random: SourceDict = {
            "kind": got.kind,
            "path": str(got.config),
            "sha256": None,
            "seed": src.seed,
        }
        return LoadedModel(
            got.model, got.arch, got.model_kwargs, random, tokenizer_dir=got.tokenizer_dir
        )
    source: SourceDict = _source(got.weights, got.kind)
    if got.directory is not None:
        source["directory"] = str(got.directory)
    return LoadedModel(
        got.model, got.arch, got.model_kwargs, source, tokenizer_dir=got.tokenizer_dir
    )


def _random_init(src: ModelSource) -> LoadedModel:
    if src.arch is None:
        raise WasiToolError("--random-init needs --arch")
    arch_family(src.arch)  # an unknown name: close names, before anything else
    if src.checkpoint is not None:
        raise WasiToolError("give either a checkpoint or --random-init, not both")
    torch.manual_seed(src.seed)
    model = build_model(
        src.arch, num_classes=src.num_classes, img_size=src.img_size, **(src.model_kwargs or {})
    )
    source: SourceDict = {"kind": "random-init", "path": None, "sha256": None, "seed": src.seed}
    return LoadedModel(model, src.arch, _kwargs_of(model, src), source)


def _kwargs_of(model: nn.Module, src: ModelSource) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int):
        kwargs["num_classes"] = num_classes
    if src.img_size is not None:
        kwargs["img_size"] = src.img_size
    kwargs.update(src.model_kwargs or {})
    return kwargs


def _from_wasi_weights(
    path: Path,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    expect_arch: str | None,
    model_class: str | None = None,
) -> LoadedModel:
    found = WeightsMetadata.from_dict(meta, path)
    arch, kwargs, shapes, token_drop = (
        found.arch,
        found.model_kwargs,
        found.factored,
        found.token_drop,
    )
    if expect_arch is not None and expect_arch != arch:
        raise WasiToolError(f"{path} holds a {arch} model, not {expect_arch}")
    family = arch_family(arch)
    family.check_arch(arch)
    family.check_rebuild(kwargs, model_class, str(path.parent))

    def build(device: str) -> nn.Module:
        with torch.device(device):
            model = family.rebuild(arch, kwargs)
        for name, (out_f, in_f, rank, bias) in shapes.items():
            try:
                # the weights come from the file, a random init would be wasted work: on the
                # meta device _NoMetaInit skips it; elsewhere skip_init does. (skip_init on the
                # meta device runs empty_like's meta kernel, a Python reference that imports
                # torch.fx's symbolic shapes and sympy: 484 modules, 0.04 GB resident.)
                if device == "meta":
                    layer = FactoredLinear(in_f, out_f, rank, bias=bias, device=device)
                else:
                    layer = torch.nn.utils.skip_init(
                        FactoredLinear, in_f, out_f, rank, bias=bias, device=device
                    )
                set_submodule(model, name, layer)
            except (AttributeError, ValueError) as exc:
                raise WasiToolError(
                    f"{path}: cannot rebuild factored layer {name}: {exc}"
                ) from None
        if token_drop:
            enable_token_drop_(model, token_drop)
        return model

    model = _load_into(build, tensors, arch)
    family.after_load_(model)
    source = _source(path, "wasi-tool-weights")
    return LoadedModel(model.eval(), arch, dict(kwargs), source)


def _from_torch_file(path: Path, src: ModelSource) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "can still be loaded" not in text:
            raise WasiToolError(
                f"cannot read checkpoint {path}: not a PyTorch file, or corrupt"
            ) from None
        if not src.trust_pickle:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            what = f" (it contains {found.group(1)})" if found else ""
            raise WasiToolError(
                f"{path} holds pickled Python objects, not only tensors{what}; loading it can run "
                "code. Pass --trust-pickle only if you trust its source"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:  # arbitrary pickles fail in arbitrary ways
            raise WasiToolError(f"cannot unpickle {path}: {exc2}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WasiToolError(f"cannot read checkpoint {path}: {exc}") from None

    if isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj), None)
        if isinstance(inner, (Mapping, nn.Module)):
            arch_hint = obj.get("arch") if isinstance(obj.get("arch"), str) else None
            obj = inner
        else:
            arch_hint = None
    else:
        arch_hint = None
    if isinstance(obj, nn.Module):
        return _from_module(obj, path, src)
    if not isinstance(obj, Mapping):
        raise WasiToolError(f"{path} holds a {type(obj).__name__}, not a state dict or a model")
    return _from_state_dict(dict(obj), src.arch or arch_hint, src, _source(path, "state-dict"))


def _from_module(model: nn.Module, path: Path, src: ModelSource) -> LoadedModel:
    arch = src.arch or family_of(model).recorded_arch(model)
    kwargs = _kwargs_of(model, src)
    if arch is not None:
        # Make sure the artifact can be rebuilt from (arch, kwargs) alone.
        _check_fit(build_model(arch, **kwargs), model.state_dict(), arch)
    return LoadedModel(model.eval(), arch, kwargs, _source(path, "pickled-module"))


def _from_state_dict(
    entries: Mapping[str, object], arch: str | None, src: ModelSource, source: SourceDict
) -> LoadedModel:
    if arch is None:
        raise WasiToolError(f"{source['path']} does not name its architecture; pass --arch")
    state = {k: v for k, v in entries.items() if isinstance(v, torch.Tensor)}
    bad = [k for k in entries if k not in state]
    if bad:
        raise WasiToolError(f"checkpoint entry {bad[0]!r} is not a tensor; expected a state dict")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    family = arch_family(arch)
    family.check_arch(arch)
    if src.img_size is None:  # a ViT fine-tuned at another size (its position embedding)
        src = dataclasses.replace(src, img_size=family.image_size_of(arch, state))
    num_classes = src.num_classes
    head = family.default_classifier(arch)
    if num_classes is None and head is not None and f"{head}.weight" in state:
        num_classes = int(state[f"{head}.weight"].shape[0])

    def build(device: str) -> nn.Module:
        with torch.device(device):
            return build_model(
                arch, num_classes=num_classes, img_size=src.img_size, **(src.model_kwargs or {})
            )

    model = _load_into(build, state, arch)
    return LoadedModel(model.eval(), arch, _kwargs_of(model, src), source)


def _check_fit(model: nn.Module, state: Mapping[str, torch.Tensor], arch: str) -> None:
    """Raise a readable WasiToolError when ``state`` does not fit ``model`` exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape mismatch", mismatched),
    ):
        if items:
            more = f" and {len(items) - 2} more" if len(items) > 2 else ""
            problems.append(f"{len(items)} {label} ({'; '.join(items[:2])}{more})")
    if problems:
        hint = " (set --num-classes/--img-size if the model differs from the default)"
        raise WasiToolError(f"weights do not fit {arch}: {', '.join(problems)}{hint}")
    for k, v in expected.items():
        if v.dtype.is_floating_point and not state[k].dtype.is_floating_point:
            _not_float(k, state[k].dtype, arch)


def _not_float(name: str, dtype: torch.dtype, where: str) -> None:
    raise WasiToolError(
        f"{where}: weight {name} is {str(dtype).removeprefix('torch.')}, not floating point "
        "(a quantised checkpoint? dequantise it to float first)"
    )


def _load_into(
    build: Callable[[str], nn.Module], state: Mapping[str, torch.Tensor], arch: str
) -> nn.Module:
    """The model ``build`` makes, holding ``state``.

    Built on the meta device and given the file's tensors (``assign``), so the weights are
    never allocated twice (a random init of ViT-B would add 0.35 GB to the load's peak);
    a model with non-persistent buffers (they are not in the file) is built for real instead.
    """
    with _NoMetaInit():
        model = build("meta")
    _check_fit(model, state, arch)
    model.load_state_dict(state, strict=True, assign=True)
    if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return model
    model = build("cpu")
    _load_state_dict(model, state, arch)
    return model


# in-place ops that only set values (a model's init): nothing to do on the meta device
_INIT_OPS = frozenset(
    {
        "uniform_",
        "normal_",
        "erfinv_",
        "mul_",
        "add_",
        "sub_",
        "div_",
        "clamp_",
        "clamp_min_",
        "clamp_max_",
        "fill_",
        "zero_",
        "copy_",
        "exp_",
        "log_",
        "sqrt_",
        "neg_",
        "abs_",
        "bernoulli_",
        "random_",
        "exponential_",
        "trunc_normal_",
        "constant_",
        "ones_",
        "zeros_",
        "eye_",
        "dirac_",
        "orthogonal_",
        "sparse_",
        "kaiming_uniform_",
        "kaiming_normal_",
        "xavier_uniform_",
        "xavier_normal_",
        "lecun_normal_",
        "variance_scaling_",
    }
)


class _NoMetaInit(TorchFunctionMode):
    """A model's random init skipped while it is built on the meta device: its values are
    replaced by the file's anyway, and meta kernels of some init ops (timm's trunc_normal_
    calls erfinv_) run through torch's Python references, which import torch._dynamo: 0.16 GB
    resident under every run that loads a checkpoint (issue 34)."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        first = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
        if (
            getattr(func, "__name__", "") in _INIT_OPS
            and isinstance(first, torch.Tensor)
            and first.is_meta
        ):
            return first
        return func(*args, **kwargs)


def _load_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], arch: str) -> None:
    _check_fit(model, state, arch)
    model.load_state_dict(state, strict=True)
