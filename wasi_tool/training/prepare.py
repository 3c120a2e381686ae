"""Turning a model into its method's training model (training/session.py calls it)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from wasi_tool.errors import WasiToolError
from wasi_tool.methods import LayerOptions, get_method, prepare_
from wasi_tool.methods.base import ModelPlan
from wasi_tool.models.targets import select_targets
from wasi_tool.nn.factored import FactoredLinear
from wasi_tool.training.config import FinetuneConfig
from wasi_tool.training.memory import apply_memory_mode_
from wasi_tool.training.results import ActRankRecord
from wasi_tool.transforms.compress import CompressConfig, CompressReportRecord, compress_

Ranks = dict[str, tuple[int, ...]]
RankRule = Callable[[list[str]], tuple[Ranks, ActRankRecord | None]]
# the input Gram matrices of the named layers on calibration data (methods.calibrate)
GramRule = Callable[[list[str]], Mapping[str, Any]]


@dataclass
class Prepared:
    """What preparing a model for its method decided."""

    targets: list[str]
    act_ranks: Ranks
    calibration: ActRankRecord | None
    plan: ModelPlan | None  # the method's model-level plan (BSR's BSRPlan)
    compress_report: CompressReportRecord | None


def choose_targets(model: nn.Module, targets: str | None) -> list[str]:
    """``targets`` as given, else the model's factored layers, else its MLP linears."""
    if targets is not None:
        return select_targets(model, targets)
    factored = [n for n, m in model.named_modules() if isinstance(m, FactoredLinear)]
    return factored or select_targets(model, "mlp")


def prepare_for_training(
    model: nn.Module,
    config: FinetuneConfig,
    act_ranks: RankRule,
    note: Callable[[str], None] = lambda message: None,
    grams: GramRule | None = None,
) -> Prepared:
    """Turn ``model`` into the method's training model, in place.

    The method's ``before_targets`` runs first (bsr: token dropping, so calibration and the
    ASI bases see the reduced token counts), then the targets are chosen and restricted
    (bsr: to the trained blocks); wsi/wasi targets that are still dense are factored at
    ``config.eps``; ``act_ranks(targets)`` picks the activation ranks of methods that compress
    them; the targets are swapped; finally the method's ``after_swap`` (bsr freezes, lora
    injects adapters); last, ``config.memory_mode`` makes the chosen regions recompute.
    """
    method = get_method(config.method)
    plan = method.before_targets(model, config, note)
    targets = method.restrict_targets(choose_targets(model, config.targets), plan)
    report: CompressReportRecord | None = None
    if method.factored_weight:
        dense = [n for n in targets if not isinstance(model.get_submodule(n), FactoredLinear)]
        if dense:
            how = f"eps {config.eps}"
            found = None
            calibrate = None
            if config.calibrate is not None:
                if grams is None:
                    raise WasiToolError(
                        "calibrate: factoring in the metric of the inputs needs training data "
                        "(finetune has it; wasi_tool.prepare needs example_input)"
                    )
                found = grams(dense)
                calibrate = f"training data:{config.calibrate}"
                how += f", calibrated on {config.calibrate} training samples"
            cfg = CompressConfig(
                targets=",".join(dense),
                eps=config.eps,
                force=True,
                calibrate=calibrate,
                eps_spectrum=config.eps_spectrum,
            )
            report = compress_(model, cfg, grams=found).to_dict()
            note(f"factored {len(dense)} dense target(s) at {how}")
    ranks, calibration = act_ranks(targets) if method.compressed_activations else ({}, None)
    options = {
        n: LayerOptions(
            ranks.get(n),
            config.update_form,  # type: ignore[arg-type]
            config.act_order,
            config.seed + k,
            int(config.act_residual_rows),
        )
        for k, n in enumerate(targets)
    }
    prepare_(model, method, targets, options)
    method.after_swap(model, targets, config, plan, note)
    lossy = config.lossy if config.memory_budget is None else "off"  # a budget's plan decides
    regions, lossy_names = apply_memory_mode_(model, config.memory_mode, lossy)
    if regions:
        note(f"memory mode {config.memory_mode}: {len(regions)} regions recompute in backward")
    if lossy_names:
        note(f"lossy storage {config.lossy}: {len(lossy_names)} norms and GELUs")
    return Prepared(targets, ranks, calibration, plan, report)
