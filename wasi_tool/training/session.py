"""The one builder of a training run, shared by every caller that trains.

``finetune`` (the stage), the training bench's worker, each federated participant and
``wasi_tool.prepare`` all get their model the same way: load (or take) a model, its batch
transform and data, fit the head to the data's classes, choose the activation ranks by one
named rule, prepare the model for its method, plan its memory under a budget, and build the
method's optimiser. Each caller keeps only its own part (the stage's artifact, the bench's
synthetic batch and timing, the client's share of the data, the user's own loop).

The activation-rank rules (``RANK_RULES``):

- ``explicit``: ``act_ranks`` for every target;
- ``per-layer``: ranks per target, e.g. those a fine-tune calibrated (``bench --train ART``);
- ``eps``: the energy rule (``act_eps``) on one calibration batch (HOSVD per mode);
- ``budget``: the least summed gradient error within ``act_budget_mb`` (dynamic programming);
- ``shape``: (B/4, N/4, min(32, C)) from the input shapes alone: for a synthetic batch (the
  bench without a fine-tune's settings), where the energy of random data means nothing.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wasi_tool.allocator import release_free_memory
from wasi_tool.data import batch_transform
from wasi_tool.data.datasets import DataSplits
from wasi_tool.data.text import load_task_data
from wasi_tool.errors import WasiToolError
from wasi_tool.measure import library_floor
from wasi_tool.methods import LoraOptions, Method, get_method
from wasi_tool.methods.calibrate import (
    calibrate_grams,
    capture,
    map_inputs,
    ranks_under_budget,
    row_mask,
    streamed_ranks_by_eps,
)
from wasi_tool.methods.options import options_of
from wasi_tool.models.families import task_of
from wasi_tool.models.loading import LoadedModel, ModelSource, load_model
from wasi_tool.training.config import FinetuneConfig
from wasi_tool.training.loop import epoch_order, first_batch, loader
from wasi_tool.training.loss import IGNORE, task_loss
from wasi_tool.training.match import MatchRecord, match_act_ranks, match_lora_rank, read_target
from wasi_tool.training.plan import (
    AutoTry,
    BudgetNotMet,
    MemoryPlan,
    parse_size,
    plan_memory,
    plan_table,
)
from wasi_tool.training.prepare import GramRule, Prepared, prepare_for_training
from wasi_tool.training.results import ActRankRecord

Ranks = dict[str, tuple[int, ...]]
Batch = Callable[[], tuple[torch.Tensor, torch.Tensor]]
Note = Callable[[str], None]

RANK_RULES = ("explicit", "per-layer", "eps", "budget", "shape")
AUTO = "auto"
# method="auto": the methods tried under the budget, most exact first. vanilla trains the
# model as it is; wsi factors the weights (eps) and keeps its gradients exact; wasi also
# compresses the activations, which biases the weight gradients (its plan says how much).
AUTO_ORDER = ("vanilla", "wsi", "wasi")


def _quiet(message: str) -> None:
    pass


@dataclass
class Session:
    """A model prepared for training, with everything that decided how.

    ``floor`` is the library floor with the model and data loaded, before preparation (the
    resident size less the weights); ``plan`` is the memory plan under ``memory_budget``.
    """

    model: nn.Module
    config: FinetuneConfig
    method: Method
    prepared: Prepared
    rule: str
    batch: Batch
    optimizer: torch.optim.Optimizer
    loaded: LoadedModel | None = None
    transform: Any = None
    splits: DataSplits | None = None
    plan: MemoryPlan | None = None
    floor: int | None = None
    match: MatchRecord | None = None  # match_memory: the target and what was chosen

    @property
    def targets(self) -> list[str]:
        return self.prepared.targets

    @property
    def act_ranks(self) -> Ranks:
        return self.prepared.act_ranks

    def rank_rule_text(self) -> str:
        """How the activation ranks were chosen, for tables ("eps, lowered by the plan")."""
        info = self.prepared.calibration or {}
        text = str(info.get("rule", self.rule))
        return f"{text}, lowered by the memory plan" if info.get("planned") else text


def fit_head(loaded: LoadedModel, classes: int, new_head: bool, note: Note = _quiet) -> None:
    """A new classifier when the data has another class count (or ``new_head``)."""
    model = loaded.model
    head_classes = getattr(model, "num_classes", None)
    if head_classes != classes or new_head:
        if not hasattr(model, "reset_classifier"):
            raise WasiToolError("the model has no reset_classifier(); cannot fit a new head")
        model.reset_classifier(classes)  # type: ignore[operator]
        note(f"new head: {head_classes} -> {classes} classes")
    loaded.model_kwargs["num_classes"] = classes


def rule_of(config: FinetuneConfig, by_layer: Mapping[str, Any] | None = None) -> str:
    """The rank rule the settings name: per-layer ranks win, then explicit, budget, eps."""
    if by_layer:
        return "per-layer"
    if config.act_ranks is not None:
        return "explicit"
    if config.act_budget_mb is not None:
        return "budget"
    return "eps"


def shape_ranks(shape: Sequence[int]) -> tuple[int, ...]:
    """(B/4, N/4, min(32, C)) for (B, N, C); (B/4, H/2, W/2, min(32, C)) for (B, H, W, C)."""
    if len(shape) == 3:
        return (max(1, shape[0] // 4), max(1, shape[1] // 4), min(32, shape[2]))
    return (max(1, shape[0] // 4), max(1, shape[1] // 2), max(1, shape[2] // 2), min(32, shape[3]))


def choose_act_ranks(
    model: nn.Module,
    targets: list[str],
    config: FinetuneConfig,
    batch: Batch,
    rule: str,
    by_layer: Mapping[str, Sequence[int]] | None = None,
    source: str | None = None,
) -> tuple[Ranks, ActRankRecord]:
    """Activation ranks of ``targets`` by ``rule`` (one of ``RANK_RULES``); ``batch()`` is the
    calibration batch of the rules that need one, ``source`` says where per-layer ranks came
    from."""
    if rule == "explicit":
        assert config.act_ranks is not None
        return {n: tuple(config.act_ranks) for n in targets}, {"rule": "explicit"}
    if rule == "per-layer":
        given = by_layer or {}
        missing = [n for n in targets if n not in given]
        if missing:
            raise WasiToolError(
                f"no activation ranks for target(s) {missing[:3]} in {source or 'the ranks given'}"
            )
        text = f"calibrated by {source}" if source else "per layer"
        return {n: tuple(int(r) for r in given[n]) for n in targets}, {"rule": text}
    if rule not in RANK_RULES:
        raise WasiToolError(f"unknown rank rule {rule!r}; choose from {', '.join(RANK_RULES)}")
    x, y = batch()
    start = time.perf_counter()
    info: ActRankRecord
    if rule == "shape":
        shapes = map_inputs(model, targets, x, lambda a: tuple(a.shape))
        ranks = {n: shape_ranks(shapes[n]) for n in targets}
        info = {"rule": "B/4, N/4, 32"}
    elif rule == "budget":
        assert config.act_budget_mb is not None
        choice = ranks_under_budget(capture(model, targets, x, y, task_loss), config.act_budget_mb)
        ranks = choice.ranks
        info = {
            "rule": "budget",
            "budget_mib": config.act_budget_mb,
            "memory_mib": choice.memory_mb,
            "summed_gradient_error": choice.error,
            "eps_per_layer": choice.eps,
        }
    else:
        eps = config.act_eps if config.act_eps is not None else config.eps
        with torch.no_grad():
            ranks = streamed_ranks_by_eps(model, targets, x, eps)
        info = {"rule": "eps", "act_eps": eps}
    info["batch"] = len(y)
    info["seconds"] = round(time.perf_counter() - start, 3)
    return ranks, info


def prepare_session(
    model: nn.Module,
    config: FinetuneConfig,
    batch: Batch,
    *,
    rule: str | None = None,
    by_layer: Mapping[str, Sequence[int]] | None = None,
    source: str | None = None,
    loaded: LoadedModel | None = None,
    transform: Any = None,
    splits: DataSplits | None = None,
    floor: int | None = None,
    grams: GramRule | None = None,
    note: Note = _quiet,
) -> Session:
    """Prepare ``model`` (in place) for ``config.method``: ranks by ``rule`` (default: the one
    the config names, ``rule_of``), the method's layers (dense wsi/wasi targets factored,
    in the metric of their inputs on ``grams`` when ``config.calibrate``), the memory mode,
    the memory plan under ``memory_budget`` (probed on ``batch()``) and the method's
    optimiser."""
    if config.method == AUTO:
        raise WasiToolError(
            "method auto chooses by loading the model once per candidate: use build_session "
            "with a model source (finetune, run)"
        )
    method = get_method(config.method)
    rule = rule or rule_of(config, by_layer)
    target = read_target(config.match_memory) if config.match_memory is not None else None
    match: MatchRecord | None = None

    def ranks(targets: list[str]) -> tuple[Ranks, ActRankRecord]:
        found, info = choose_act_ranks(model, targets, config, batch, rule, by_layer, source)
        if rule in ("eps", "budget"):
            note(f"activation ranks by {info['rule']} on one batch of {info['batch']}")
        return found, info

    if target is not None and method.adapter:

        def prepare_copy(copy: nn.Module, trial: FinetuneConfig) -> list[str]:
            return prepare_for_training(copy, trial, ranks, grams=grams).targets

        rank, match = match_lora_rank(model, config, batch, target, prepare_copy)
        config = dataclasses.replace(
            config, options=dataclasses.replace(options_of(config, LoraOptions), rank=rank)
        )
    prepared = prepare_for_training(model, config, ranks, note, grams)
    if target is not None and method.compressed_activations:
        found, prepared.calibration, match = match_act_ranks(model, prepared.targets, batch, target)
        prepared.act_ranks = found
    if match is not None:
        note(
            f"match memory: {match.setting} {match.chosen}, {match.probe_bytes / 1e6:.1f} MB "
            f"against {match.run}'s {match.target_bytes / 1e6:.1f} MB "
            f"({match.probe_over_target:.3f}x)"
        )
    # what the preparation freed (a calibration forward's activations, replaced weights) goes
    # back to the system before the floor is read and training starts
    release_free_memory()
    plan = None
    if config.memory_budget is not None:
        x, y = batch()
        plan = plan_memory(
            model,
            x,
            y,
            parse_size(config.memory_budget),
            floor=library_floor(model) or 0,  # resident as training starts, less the weights
            momentum=config.momentum,
            lossy=config.lossy,
            plan_ranks=method.compressed_activations and config.act_ranks is None,
        )
        plan.method = config.method
        note(plan_table(plan))
        if plan.chosen.act_ranks is not None:  # the plan lowered the calibrated ranks
            prepared.act_ranks = {n: tuple(r) for n, r in plan.chosen.act_ranks.items()}
            prepared.calibration = {**(prepared.calibration or {}), "planned": True}
        release_free_memory()  # what the probe steps freed, before the first step
    model.train()
    return Session(
        model=model,
        config=config,
        method=method,
        prepared=prepared,
        rule=rule,
        batch=batch,
        optimizer=method.optimizer(model, config),
        loaded=loaded,
        transform=transform,
        splits=splits,
        plan=plan,
        floor=floor,
        match=match,
    )


def load_session_data(
    loaded: LoadedModel, data: str | Path, config: FinetuneConfig
) -> tuple[Any, DataSplits]:
    """The model's batch transform and the task's splits of ``data``."""
    transform = batch_transform(loaded)
    splits = load_task_data(
        loaded,
        data,
        transform.size,
        config.val_fraction,
        config.seed,
        config.classes,
        seq_len=config.seq_len,
    )
    return transform, splits


def build_session(
    source: ModelSource | LoadedModel,
    data: str | Path | tuple[Any, DataSplits],
    config: FinetuneConfig,
    *,
    train: Any = None,
    before_prepare: Callable[[LoadedModel, DataSplits], None] | None = None,
    note: Note = _quiet,
) -> Session:
    """Load, data, head, ranks, preparation, plan, optimiser: a whole training run's setup.

    ``data`` is a data spec, or an already loaded (transform, splits) pair; ``train`` is the
    training set the calibration batch comes from (default: the splits' train set, a
    federated client passes its share). ``before_prepare`` runs once the head is fitted and
    before the model changes (finetune's perplexity before training). The library floor is
    read after the data and the head, before preparation.
    """
    if isinstance(source, ModelSource):
        torch.manual_seed(config.seed)  # a caller that loads the model seeds before it
        loaded = load_model(source)
    elif config.method == AUTO:
        raise WasiToolError(
            "method auto loads the model once per candidate method: give a model source, "
            "not a loaded model"
        )
    else:
        loaded = source
    if isinstance(data, tuple):
        transform, splits = data
    else:
        transform, splits = load_session_data(loaded, data, config)
    if task_of(loaded.model).fits_head:  # next-token models keep their vocabulary head
        fit_head(loaded, splits.num_classes, config.new_head, note)
    if before_prepare is not None:
        before_prepare(loaded, splits)
    release_free_memory()  # what loading freed (a checkpoint's state dict, the data's reading)
    floor = library_floor(loaded.model)
    train_set = splits.train if train is None else train

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return first_batch(train_set, config, transform)

    def session_of(loaded: LoadedModel, config: FinetuneConfig) -> Session:
        def grams(names: list[str]) -> Mapping[str, Any]:
            return training_grams(loaded.model, names, train_set, config, transform)

        return prepare_session(
            loaded.model,
            config,
            batch,
            loaded=loaded,
            transform=transform,
            splits=splits,
            floor=floor,
            grams=grams,
            note=note,
        )

    if config.method != AUTO:
        return session_of(loaded, config)
    assert isinstance(source, ModelSource)
    tried: list[AutoTry] = []
    for k, name in enumerate(AUTO_ORDER):
        if k:  # the model as loaded, with the same head, for the next candidate
            del loaded
            gc.collect()
            torch.manual_seed(config.seed)
            loaded = load_model(source)
            if task_of(loaded.model).fits_head:
                fit_head(loaded, splits.num_classes, config.new_head)
        chosen = dataclasses.replace(config, method=name)
        try:
            session = session_of(loaded, chosen)
        except BudgetNotMet as exc:
            tried.append({"method": name, "fits": False, "why": str(exc)})
            note(f"method auto: {name} does not fit ({exc})")
            continue
        assert session.plan is not None
        tried.append({"method": name, "fits": True, "memory_mode": session.plan.chosen.label})
        why = _auto_reason(name, session.plan, tried, config)
        session.plan.auto = {"order": list(AUTO_ORDER), "tried": tried, "why": why}
        note(f"method auto: {name}, {why}")
        return session
    raise WasiToolError(
        f"memory budget {config.memory_budget} cannot be met by any method "
        f"({', '.join(AUTO_ORDER)}); the last: {tried[-1]['why']}"
    )


def _auto_reason(name: str, plan: MemoryPlan, tried: list[AutoTry], config: Any) -> str:
    """Why method auto chose ``name``: it is the most exact candidate whose plan fits."""
    fits = f"fits {plan.budget / 1e9:.2f} GB with memory mode {plan.chosen.label}"
    fits += f" (predicted peak {plan.chosen.peak / 1e9:.2f} GB)"
    before = [t["method"] for t in tried if not t["fits"]]
    lead = f"{' and '.join(before)} did not fit; " if before else ""
    if name == "vanilla":
        return f"{lead}{fits}: the model trains as it is, gradients exact"
    if name == "wsi":
        return f"{lead}{fits}: weights factored at eps {config.eps}, gradients exact"
    return (
        f"{lead}{fits}: activations compressed, relative weight-gradient error "
        f"{plan.chosen.gradient_error:.3f} on the probe batch"
    )


def training_grams(
    model: nn.Module, names: list[str], train_set: Any, config: FinetuneConfig, transform: Any
) -> Mapping[str, Any]:
    """The named layers' input Gram matrices on the first ``config.calibrate`` training
    samples in epoch 0's order (the run's own data; padding rows left out), streamed."""
    assert config.calibrate is not None
    count = min(int(config.calibrate), len(train_set))
    order = epoch_order(len(train_set), config.seed, 0)[:count]

    def batches() -> Any:
        for images, labels in loader(train_set, config.batch_size, order):
            x = transform(images)
            yield x, row_mask(model, x, labels, IGNORE)

    return calibrate_grams(model, names, batches())


def calibrate_on_first_batch_(
    model: nn.Module,
    targets: Sequence[str],
    eps: float,
    done: Callable[[Ranks, ActRankRecord], None],
) -> Any:
    """Choose the activation ranks of ``targets`` (subspace layers already in place) on the
    first training forward of ``model``: the energy rule ``eps`` on that batch, exactly as a
    calibration batch passed beforehand would (the same inputs reach the same layers: the
    layers' no-grad path is their plain module's). ``done(ranks, info)`` hears the result
    once. Returns the hook handle (removed once it ran)."""
    from wasi_tool.nn.subspace import SubspaceLayer

    def calibrate(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        handle.remove()
        start = time.perf_counter()
        rule = _eps_ranks(eps)
        ranks: Ranks = {}
        hooks = [
            model.get_submodule(n).register_forward_pre_hook(
                lambda m, a, n=n: ranks.__setitem__(n, rule(a[0].detach()))
            )
            for n in targets
        ]
        try:  # as map_inputs: one eval-mode pass, no input kept
            model.eval()
            with torch.no_grad():
                model(*args, **kwargs)
        finally:
            model.train()
            for h in hooks:
                h.remove()
        for name in targets:
            layer = model.get_submodule(name)
            if isinstance(layer, SubspaceLayer) and layer.act is not None:
                layer.set_act_ranks(ranks[name])  # bases start afresh; fixed ones stay fixed
        batch = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) else None
        done(
            ranks,
            {
                "rule": "eps",
                "act_eps": eps,
                "batch": batch,
                "seconds": round(time.perf_counter() - start, 3),
                "when": "first training batch",
            },
        )

    handle = model.register_forward_pre_hook(calibrate, with_kwargs=True)
    return handle


def _eps_ranks(eps: float) -> Callable[[torch.Tensor], tuple[int, ...]]:
    from wasi_tool.methods.calibrate import spectra

    return lambda a: spectra(a).ranks(eps)
