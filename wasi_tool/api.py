"""One call for the user's own model and loop: ``prepare`` and ``save_artifact``.

In the style of peft's ``get_peft_model`` and torchao's ``quantize_``::

    model, optimizer = wasi_tool.prepare(model, method="wasi", targets="mlp", eps=0.8, lr=0.05)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
    wasi_tool.save_artifact(model, "runs/my-model", example_input=x[:1])

Both are built on the pieces the CLI uses: ``training.session`` (the one builder of a
training run: the method's training model and its optimiser) and the artifact writer.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.methods import finalize_, get_method
from wasi_tool.models import custom
from wasi_tool.models.inputs import check_example_input
from wasi_tool.models.registry import classifier_names
from wasi_tool.models.targets import LINEAR_TYPES, select_targets, split_patterns
from wasi_tool.nn.fastpath import fast_paths_given_up
from wasi_tool.training.config import FinetuneConfig
from wasi_tool.training.results import ActRankRecord
from wasi_tool.transforms.compress import CompressReportRecord

log = logging.getLogger("wasi_tool")

Targets = str | Sequence[str] | type[nn.Module] | tuple[type[nn.Module], ...]

CLIP_NOTE = (
    "gradient clipping: pass clip= to prepare (one global norm over ordinary gradients and "
    "the WSI gradient factors); torch.nn.utils.clip_grad_norm_ sees only .grad tensors, and "
    "the factors L, R of wsi/wasi layers hold none (their gradient stays factored)"
)


@dataclass
class PrepareReport:
    """What ``prepare`` did: the method, its targets, their activation ranks, the notes
    (factoring, fast paths given up, clipping) and the compress report (if it factored)."""

    method: str
    targets: list[str]
    act_ranks: dict[str, tuple[int, ...]]
    notes: list[str] = field(default_factory=list)
    compress: CompressReportRecord | None = None

    def __str__(self) -> str:
        lines = [f"wasi_tool.prepare: {self.method} on {len(self.targets)} target(s)"]
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)


def resolve_targets(model: nn.Module, targets: Targets, exclude: Sequence[str] = ()) -> list[str]:
    """Target names from a preset or globs (as ``--targets``), a list of names/globs, or
    module types (every linear of those types but the classifier head: timm's
    ``get_classifier()``, else the model's last linear in module order). Linears that
    nn.MultiheadAttention reads as raw weights (``out_proj``) are never targets. As for
    ``--targets``, the head is left out unless named exactly."""
    mha = {
        f"{n}.out_proj" if n else "out_proj"
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }
    if isinstance(targets, type) or (
        isinstance(targets, tuple) and targets and all(isinstance(t, type) for t in targets)
    ):
        kinds = targets if isinstance(targets, tuple) else (targets,)
        linears = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]
        heads = classifier_names(model) or set(linears[-1:])
        names = [
            n
            for n, m in model.named_modules()
            if isinstance(m, kinds) and isinstance(m, LINEAR_TYPES) and n not in heads
        ]
        names = [n for n in names if n not in mha]
        if not names:
            raise WasiToolError(f"no linear layer of type {[k.__name__ for k in kinds]} here")
        spec = ",".join(names)
    else:
        spec = targets if isinstance(targets, str) else ",".join(targets)  # type: ignore[arg-type]
    chosen = select_targets(model, spec, exclude)
    if not classifier_names(model):  # not a timm model: its last linear is taken as the head
        last = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)][-1]
        if last in chosen and last not in split_patterns(spec) and len(chosen) > 1:
            chosen.remove(last)
    named_mha = [n for n in chosen if n in mha]
    chosen = [n for n in chosen if n not in mha]
    if not chosen:
        raise WasiToolError(
            f"targets {spec!r} match only nn.MultiheadAttention out_proj layers "
            f"({', '.join(named_mha[:2])}): MultiheadAttention reads their weight directly, so "
            "they stay dense"
        )
    return chosen


_RECIPE = FinetuneConfig()  # finetune's defaults (the paper's recipe)


def prepare(
    model: nn.Module,
    method: str = "wasi",
    targets: Targets = "mlp",
    *,
    lr: float = _RECIPE.lr,
    eps: float = _RECIPE.eps,
    exclude: Sequence[str] = (),
    act_ranks: Sequence[int] | None = None,
    act_eps: float | None = None,
    example_input: torch.Tensor | None = None,
    momentum: float = _RECIPE.momentum,
    weight_decay: float = _RECIPE.weight_decay,
    clip: float | None = _RECIPE.clip,
    update_form: str = _RECIPE.update_form,
    memory_mode: str = _RECIPE.memory_mode,
    memory_budget: str | None = None,
    calibrate: bool = False,
    seed: int = 0,
    verbose: bool = True,
    **baseline: Any,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Turn ``model`` (in place) into ``method``'s training model; return it and its optimiser.

    Args:
        method: vanilla, asi, wsi, wasi, lora (and bsr, bsr+wasi on timm-style ViTs).
        targets: a preset (mlp, attn, all), comma-separated globs, a list of names/globs, or
            module types (e.g. ``nn.Linear``); dense wsi/wasi targets are factored at ``eps``.
        act_ranks / act_eps: activation ranks (asi, wasi): explicit per-mode ranks, or by the
            energy rule (default ``eps``) on ``example_input`` when given, else on the first
            training batch the model sees (the same ranks as passing that batch here).
        lr, momentum, weight_decay, clip: the optimiser (the method's own; for every built-in
            method ``SubspaceSGD``, a ``torch.optim.Optimizer``: stock LR schedulers drive its
            groups' ``lr``); ``clip`` is the global gradient-norm clip (see ``CLIP_NOTE``).
            The defaults are ``finetune``'s (the paper's recipe), from ``FinetuneConfig``.
        memory_mode: "off", or recompute in backward instead of saving ("block", "mlp",
            "attn": the model's repeated blocks, or those halves of them), exactly.
        memory_budget: the step's whole-process peak, e.g. "1.2GB": the planner picks the
            least recompute that fits, probed on ``example_input`` (required then).
        calibrate: factor dense wsi/wasi targets in the metric of their inputs on
            ``example_input`` (required then; SVD-LLM's whitening, as ``compress --calibrate``)
            instead of by plain SVD.
        baseline: the method's own options by their flat keys (``FinetuneConfig.from_flat``):
            lora_rank, lora_alpha, lora_dropout, lora_recompute, lora_fa_projection (lora,
            lora-fa); bsr_blocks, drop_at, keep_rate, fuse (bsr, bsr+wasi); mezo_mu (mezo).
            A key of another method's options is refused.

    The report (``PrepareReport``) is ``model.wasi_prepared``; it goes to the ``wasi_tool``
    logger (INFO with ``verbose``, else DEBUG), including which PyTorch fast paths are given
    up. Nothing is printed.
    """
    from wasi_tool.training.session import calibrate_on_first_batch_, prepare_session

    spec = get_method(method)
    names = resolve_targets(model, targets, exclude)
    if example_input is not None:  # before anything changes the model
        check_example_input(model, example_input)
    defer = (
        spec.compressed_activations
        and act_ranks is None
        and example_input is None
        and memory_budget is None
    )
    if memory_budget is not None and example_input is None:
        raise WasiToolError("memory_budget plans on a batch: pass example_input=<a training batch>")
    if calibrate and example_input is None:
        raise WasiToolError("calibrate factors on real inputs: pass example_input=<a batch>")
    config = FinetuneConfig.from_flat(
        method=spec.name,
        targets=",".join(names),
        eps=eps,
        # deferred: placeholder ranks now, the real ones on the first training batch
        act_ranks=[1, 1, 1] if defer else (list(act_ranks) if act_ranks is not None else None),
        act_eps=None if defer else act_eps,
        lr=lr,
        lr_min=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        clip=clip,
        update_form=update_form,
        memory_mode=memory_mode,
        memory_budget=memory_budget,
        calibrate=len(example_input) if calibrate and example_input is not None else None,
        seed=seed,
        **baseline,
    )
    notes: list[str] = []

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        assert example_input is not None
        return example_input, torch.zeros(len(example_input), dtype=torch.long)

    def grams(chosen: list[str]) -> dict[str, Any]:
        from wasi_tool.methods.calibrate import calibrate_grams

        assert example_input is not None
        return calibrate_grams(model, chosen, [example_input])

    session = prepare_session(model, config, batch, grams=grams, note=notes.append)
    prepared = session.prepared
    notes += fast_paths_given_up(model)
    if spec.factored_weight:
        notes.append(CLIP_NOTE)
    level = logging.INFO if verbose else logging.DEBUG
    ranks = {} if defer else prepared.act_ranks
    report = PrepareReport(spec.name, prepared.targets, ranks, notes, prepared.compress_report)
    object.__setattr__(model, "wasi_prepared", report)
    if defer:
        rule_eps = act_eps if act_eps is not None else eps

        def calibrated(found: dict[str, tuple[int, ...]], info: ActRankRecord) -> None:
            report.act_ranks.update(found)
            line = (
                f"wasi_tool.prepare: activation ranks of {len(found)} target(s) calibrated by "
                f"act_eps {rule_eps} on the first training batch ({info['batch']} samples)"
            )
            report.notes.append(line)
            log.log(level, line)

        calibrate_on_first_batch_(model, prepared.targets, rule_eps, calibrated)
        notes.append(
            f"activation ranks: by act_eps {rule_eps} on the first training batch (pass "
            "example_input= or act_ranks= to choose them now)"
        )
    log.log(level, "%s", report)
    return model, session.optimizer


def save_artifact(
    model: nn.Module,
    out: str | Path,
    *,
    example_input: torch.Tensor,
    model_class: str | None = None,
    config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (a copy, back to plain modules) as a wasi-tool artifact at ``out``.

    The artifact records ``arch = "custom"``, the class path ``model_class`` (``pkg.mod:Class``;
    inferred from ``type(model)`` when not given) and ``config`` (JSON: the constructor's
    keyword arguments, default ``{}``), and the example input's shape and dtype, so that
    ``export``/``bench`` and ``load_model`` rebuild it when the user names the same class
    (``--model-class``; code is never run from an artifact otherwise). The class is rebuilt
    here once (on the meta device) to check that the weights fit it.
    """
    from wasi_tool.artifact import SAVE_ARTIFACT, StageRecord
    from wasi_tool.models.loading import LoadedModel, _check_fit
    from wasi_tool.stages.common import write_stage_artifact

    plain = copy.deepcopy(model)
    report = getattr(model, "wasi_prepared", None)
    finalize_(plain, report.method if isinstance(report, PrepareReport) else None)
    plain.eval()
    path = model_class or custom.class_path(type(model))
    if custom.import_class(path) is not type(model):
        raise WasiToolError(f"model_class {path} is not the model's class {type(model).__name__}")
    config = dict(config or {})
    try:
        json.dumps(config)
    except TypeError as exc:
        raise WasiToolError(f"config must be JSON (the constructor's arguments): {exc}") from None
    if not isinstance(example_input, torch.Tensor):
        raise WasiToolError("example_input must be a tensor (one input batch)")
    record = custom.CustomRecord(
        path,
        config,
        tuple(example_input.shape),
        str(example_input.dtype).removeprefix("torch."),
        None if example_input.is_floating_point() else int(example_input.max()),
    )
    with torch.device("meta"):
        rebuilt = custom.build_custom(record)
    _swap_like(rebuilt, plain)
    _check_fit(rebuilt, plain.state_dict(), path)
    custom.mark_(plain, record)
    loaded = LoadedModel(
        plain,
        custom.CUSTOM_ARCH,
        record.to_kwargs(),
        {"kind": "python", "path": None, "sha256": None, "model_class": path},
    )
    stage = StageRecord(SAVE_ARTIFACT, {"prepare": _report_dict(report)})
    write_stage_artifact(
        loaded, Path(out), [stage], [], {"notes": fast_paths_given_up(plain)}, overwrite=overwrite
    )
    return Path(out)


def _swap_like(target: nn.Module, source: nn.Module) -> None:
    """Put ``source``'s FactoredLinear layers (shapes only) into ``target`` (meta device)."""
    from wasi_tool.nn.factored import FactoredLinear
    from wasi_tool.nn.swap import set_submodule

    for name, m in source.named_modules():
        if isinstance(m, FactoredLinear):
            try:
                layer = FactoredLinear(
                    m.in_features, m.out_features, m.rank, bias=m.bias is not None, device="meta"
                )
                set_submodule(target, name, layer)
            except AttributeError:
                raise WasiToolError(f"{name} is not a module of the rebuilt class") from None


def _report_dict(report: Any) -> dict[str, Any] | None:
    if not isinstance(report, PrepareReport):
        return None
    out = dataclasses.asdict(report)
    out["act_ranks"] = {k: list(v) for k, v in report.act_ranks.items()}
    out.pop("compress", None)
    return out
