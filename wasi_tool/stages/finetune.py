"""The finetune stage: train a model with one of the registered methods on an offline dataset.

Reads a checkpoint or artifact, prepares the target layers for the method, trains with the
paper's recipe by default (SGD momentum 0, weight decay 1e-4, cosine to lr_min, global-norm
clip 2.0), evaluates and checkpoints each epoch, and writes an artifact plus metrics.json.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from wasi_tool import artifacts
from wasi_tool.config import StageConfig
from wasi_tool.data import BatchTransform, DataSplits
from wasi_tool.data.text import TokenBatch, load_task_data
from wasi_tool.errors import WasiToolError
from wasi_tool.measure import SavedBytesMeter, peak_rss_bytes
from wasi_tool.methods import LayerOptions, SubspaceSGD, finalize_, get_method, prepare_
from wasi_tool.methods.bsr import (
    BSRPlan,
    enable_token_drop_,
    freeze_outside_,
    plan_bsr,
    tokens_per_block,
    trainable_names,
)
from wasi_tool.methods.calibrate import MB, capture, ranks_by_eps, ranks_under_budget
from wasi_tool.methods.lora import apply_lora_
from wasi_tool.methods.options import BaselineOptions
from wasi_tool.models import hf
from wasi_tool.models.loading import LoadedModel, ModelSource, load_model
from wasi_tool.models.targets import select_targets
from wasi_tool.nn.factored import FactoredLinear
from wasi_tool.nn.subspace import ASILinear, WASILinear
from wasi_tool.ops import accounting, check_eps
from wasi_tool.ops.tucker import ASI_ORDERS
from wasi_tool.ops.wsi import UPDATE_FORMS
from wasi_tool.stages.common import write_stage_artifact
from wasi_tool.stages.compress import CompressConfig, compress_

CHECKPOINT = "last.pt"
METRICS = "metrics.json"


@dataclass
class FinetuneConfig(StageConfig, BaselineOptions):
    """How to fine-tune.

    Args:
        method: vanilla, asi, wsi, wasi, bsr, bsr+wasi or lora.
        targets: layers the method acts on: a preset or globs as in compress; by default the
            model's factored layers, or the MLP linears when it has none.
        eps: weight rank rule for wsi/wasi targets that are still dense (factored first).
        act_ranks: explicit per-mode activation ranks, e.g. [16, 12, 32] for (B, N, C).
        act_eps: activation ranks by the energy rule on a calibration batch (HOSVD).
        act_budget_mb: per-layer activation ranks minimising the gradient error within this
            many MiB of saved activations (dynamic programming on a calibration batch).
            Without any of the three, act_eps = eps.
        act_order: ASI mode order, "sequential" (one HOOI sweep) or "parallel" (reference).
        update_form: WSI update, "projection" (R' = L'^T W') or "paper" (R' = L^T W').
        epochs, batch_size, lr, lr_min, momentum, weight_decay, clip, seed: the recipe; the
            learning rate follows a cosine from lr to lr_min over all steps.
        val_fraction: held-out share when the dataset has no test split.
        classes: train on these classes only (relabelled 0..n-1).
        max_steps: stop each epoch after this many steps (quick runs).
        bsr_blocks, drop_at, keep_rate, fuse, lora_rank, lora_alpha, lora_dropout: the
            baselines' settings (BaselineOptions); targets outside BSR's trained blocks stay
            frozen.
        new_head: a fresh classifier even when the class count matches (a new task).
    """

    stage: ClassVar[str] = "finetune"

    method: str = "wasi"
    targets: str | None = None
    eps: float = 0.8
    act_ranks: list[int] | None = None
    act_eps: float | None = None
    act_budget_mb: float | None = None
    act_order: str = "sequential"
    update_form: str = "projection"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.05
    lr_min: float = 0.005
    momentum: float = 0.0
    weight_decay: float = 1e-4
    clip: float | None = 2.0
    seed: int = 233
    val_fraction: float = 0.1
    classes: list[int] | None = None
    max_steps: int | None = None
    new_head: bool = False

    def __post_init__(self) -> None:
        spec = get_method(self.method)
        for name in ("bsr_blocks", "drop_at"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, [int(v) for v in value])
        if not 0.0 < self.keep_rate <= 1.0:
            raise WasiToolError(f"keep_rate must be in (0, 1], got {self.keep_rate}")
        if int(self.lora_rank) < 1:
            raise WasiToolError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise WasiToolError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        self.eps = check_eps(self.eps, "eps")
        given = [
            k for k in ("act_ranks", "act_eps", "act_budget_mb") if getattr(self, k) is not None
        ]
        if len(given) > 1:
            raise WasiToolError(f"give one of act_ranks, act_eps, act_budget_mb (got {given})")
        if self.act_ranks is not None:
            self.act_ranks = [int(r) for r in self.act_ranks]
            if len(self.act_ranks) not in (3, 4) or min(self.act_ranks) < 1:
                raise WasiToolError(
                    f"act_ranks takes 3 (B, N, C) or 4 (B, H, W, C) positive ranks, "
                    f"got {self.act_ranks}"
                )
        if self.act_eps is not None:
            self.act_eps = check_eps(self.act_eps, "act_eps")
        elif spec.compressed_activations and not given:
            self.act_eps = self.eps
        if self.act_budget_mb is not None and not self.act_budget_mb > 0:
            raise WasiToolError(f"act_budget_mb must be positive, got {self.act_budget_mb}")
        if self.act_order not in ASI_ORDERS:
            raise WasiToolError(f"act_order must be one of {ASI_ORDERS}, got {self.act_order!r}")
        if self.update_form not in UPDATE_FORMS:
            raise WasiToolError(
                f"update_form must be one of {UPDATE_FORMS}, got {self.update_form!r}"
            )
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise WasiToolError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise WasiToolError(f"max_steps must be >= 1, got {self.max_steps}")
        for name in ("lr", "lr_min", "weight_decay", "momentum"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise WasiToolError(f"{name} must be a finite number >= 0, got {value}")
        if self.lr <= 0 or self.lr_min > self.lr:
            raise WasiToolError(f"need 0 < lr_min <= lr, got lr={self.lr}, lr_min={self.lr_min}")
        if self.clip is not None and not self.clip > 0:
            raise WasiToolError(f"clip must be positive (or None for no clipping), got {self.clip}")
        if spec.factored_weight and self.momentum != 0:
            raise WasiToolError(
                "the WSI update has no momentum (the paper uses 0): set momentum 0 for wsi/wasi"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise WasiToolError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


class Progress(Protocol):
    """What the training loop reports; the CLI renders it, the library never prints."""

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...

    def step(self, loss: float, accuracy: float, images_per_second: float) -> None: ...

    def end_epoch(self, record: dict[str, Any]) -> None: ...

    def note(self, message: str) -> None: ...


class _Silent:
    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def step(self, loss: float, accuracy: float, images_per_second: float) -> None:
        pass

    def end_epoch(self, record: dict[str, Any]) -> None:
        pass

    def note(self, message: str) -> None:
        pass


def model_input_size(loaded: LoadedModel) -> int:
    """The square input size the model was built for."""
    size = loaded.model_kwargs.get("img_size")
    if size is None:
        embed = getattr(loaded.model, "patch_embed", None)
        img = getattr(embed, "img_size", None)
        if img is not None:
            size = img[0] if isinstance(img, (tuple, list)) else img
    if size is None:
        cfg = getattr(loaded.model, "pretrained_cfg", {}) or {}
        size = cfg.get("input_size", (3, 224, 224))[-1]
    return int(size)


def batch_transform(loaded: LoadedModel) -> BatchTransform:
    if hf.is_hf(loaded.model):  # text: token ids go to the model as they are
        return TokenBatch()
    cfg = getattr(loaded.model, "pretrained_cfg", {}) or {}
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    return BatchTransform(model_input_size(loaded), mean, std)


def _loader(ds: Dataset[Any], batch_size: int, order: list[int] | None = None) -> DataLoader[Any]:
    return DataLoader(ds, batch_size=batch_size, sampler=order, shuffle=False, num_workers=0)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a function of (seed, epoch) only, so a resumed run sees
    the same batches as an uninterrupted one."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def choose_targets(model: nn.Module, targets: str | None) -> list[str]:
    if targets is not None:
        return select_targets(model, targets)
    factored = [n for n, m in model.named_modules() if isinstance(m, FactoredLinear)]
    return factored or select_targets(model, "mlp")


@torch.no_grad()
def evaluate(
    model: nn.Module, ds: Dataset[Any], transform: BatchTransform, batch_size: int
) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy over ``ds`` in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in _loader(ds, batch_size):
        logits = model(transform(images))
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        count += len(labels)
    model.train(was_training)
    return {"loss": loss_sum / max(1, count), "accuracy": correct / max(1, count)}


def _inside(targets: list[str], blocks: list[str]) -> list[str]:
    inside = [t for t in targets if any(t.startswith(f"{b}.") for b in blocks)]
    if not inside:
        raise WasiToolError(
            f"none of the {len(targets)} target layer(s) is inside the trained blocks "
            f"({', '.join(blocks)}): choose --targets or --bsr-blocks that overlap"
        )
    return inside


def _layer_accounting(
    model: nn.Module,
    targets: list[str],
    method: str,
    act_shapes: dict[str, tuple[int, ...]],
    lora_rank: int | None = None,
) -> list[dict[str, Any]]:
    """Analytic memory and FLOPs per target layer, ours and the reference code's count."""
    rows = []
    for name in targets:
        layer: Any = model.get_submodule(name)
        if hasattr(layer, "get_base_layer"):  # a peft LoRA layer
            layer = layer.get_base_layer()
        shape = act_shapes.get(name)
        if shape is None:
            continue
        o, i = int(layer.out_features), int(layer.in_features)
        rank = int(layer.rank) if isinstance(layer, WASILinear) else lora_rank
        act = getattr(layer, "act", None)
        ranks = tuple(min(r, d) for r, d in zip(act.ranks, shape, strict=True)) if act else None
        mem = accounting.layer_memory_elements(method, shape, o, i, rank, ranks)
        row: dict[str, Any] = {
            "name": name,
            "act_shape": list(shape),
            "out_features": o,
            "in_features": i,
            "rank": rank,
            "act_ranks": list(ranks) if ranks else None,
            "memory_elements": mem,
            "memory_mib_fp32": {k: v * 4 / MB for k, v in mem.items()},
            "flops_per_step": accounting.layer_step_flops(method, shape, o, i, rank, ranks),
        }
        if len(shape) == 3 and method in ("vanilla", "asi", "wsi", "wasi"):
            row["flops_per_step_reference_code"] = accounting.reference_code_flops(
                method, shape, o, i, rank, ranks
            )
        rows.append(row)
    return rows


@torch.no_grad()
def first_non_finite_output(model: nn.Module, x: torch.Tensor) -> str:
    """The first leaf module (in execution order) whose output has a NaN or inf."""
    found: list[str] = []

    def hook(name: str) -> Any:
        def check(mod: nn.Module, args: Any, out: Any) -> None:
            if not found and isinstance(out, torch.Tensor) and not bool(torch.isfinite(out).all()):
                found.append(name)

        return check

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if n and not any(True for _ in m.children())
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else "none found again (the input itself?)"


def first_non_finite_grad(model: nn.Module) -> str | None:
    """Name of the first parameter (or WASI layer's gradient factor) that is not finite."""
    for name, module in model.named_modules():
        pending = module.sink.p if isinstance(module, WASILinear) else None
        if pending is not None and not bool(torch.isfinite(pending).all()):
            return f"{name} (WASI gradient factor P)"
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return name
    return None


RankRule = Callable[[list[str]], tuple[dict[str, tuple[int, ...]], dict[str, Any] | None]]


@dataclass
class Prepared:
    """What preparing a model for its method decided."""

    targets: list[str]
    act_ranks: dict[str, tuple[int, ...]]
    calibration: dict[str, Any] | None
    bsr_plan: BSRPlan | None
    compress_report: dict[str, Any] | None


def prepare_for_training(
    model: nn.Module,
    config: FinetuneConfig,
    act_ranks: RankRule,
    note: Callable[[str], None] = lambda message: None,
) -> Prepared:
    """Turn ``model`` into the method's training model, in place (finetune and bench share it).

    bsr: token dropping goes in first (calibration and the ASI bases then see the reduced
    token counts) and the targets are limited to the trained blocks; wsi/wasi targets that are
    still dense are factored at ``config.eps``; ``act_ranks(targets)`` picks the activation
    ranks of methods that compress them; the targets are swapped; finally bsr freezes all but
    its trained modules and lora injects its adapters.
    """
    method = get_method(config.method)
    plan: BSRPlan | None = None
    if method.block_selective:
        plan = plan_bsr(model, config.bsr_blocks, config.drop_at, config.keep_rate, config.fuse)
        for message in plan.notes:
            note(message)
        enable_token_drop_(
            model, {plan.blocks[i]: (plan.keep_rate, plan.fuse) for i in plan.drop_at}
        )
    targets = choose_targets(model, config.targets)
    if plan is not None:
        targets = _inside(targets, plan.trained_names)
    report: dict[str, Any] | None = None
    if method.factored_weight:
        dense = [n for n in targets if not isinstance(model.get_submodule(n), FactoredLinear)]
        if dense:
            cfg = CompressConfig(targets=",".join(dense), eps=config.eps, force=True)
            report = compress_(model, cfg).to_dict()
            note(f"factored {len(dense)} dense target(s) at eps {config.eps}")
    ranks, calibration = act_ranks(targets) if method.compressed_activations else ({}, None)
    options = {
        n: LayerOptions(
            ranks.get(n),
            config.update_form,  # type: ignore[arg-type]
            config.act_order,
            config.seed + k,
        )
        for k, n in enumerate(targets)
    }
    prepare_(model, config.method, targets, options)
    if plan is not None:
        trained = trainable_names(model, plan)
        freeze_outside_(model, trained)
        note(
            f"bsr: training {', '.join(trained)}; tokens dropped in blocks {plan.drop_at or 'none'}"
        )
    if method.lora:
        apply_lora_(
            model, targets, config.lora_rank, config.lora_alpha, config.lora_dropout, config.seed
        )
    return Prepared(targets, ranks, calibration, plan, report)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class FinetuneResult:
    loaded: LoadedModel
    out: Path
    metrics: dict[str, Any]
    files: dict[str, Any] = field(default_factory=dict)


class _Run:
    """The state of one fine-tuning run (built fresh, or restored from a checkpoint)."""

    def __init__(
        self,
        source: ModelSource,
        data: str | Path,
        config: FinetuneConfig,
        ckpt_dir: Path,
        progress: Progress,
    ) -> None:
        self.config, self.ckpt_dir, self.progress = config, ckpt_dir, progress
        torch.manual_seed(config.seed)
        self.loaded = load_model(source)
        model = self.loaded.model
        self.transform = batch_transform(self.loaded)
        self.data: DataSplits = load_task_data(
            self.loaded, data, self.transform.size, config.val_fraction, config.seed, config.classes
        )
        self.data_spec = str(data)
        head_classes = getattr(model, "num_classes", None)
        if head_classes != self.data.num_classes or config.new_head:
            if not hasattr(model, "reset_classifier"):
                raise WasiToolError("the model has no reset_classifier(); cannot fit a new head")
            model.reset_classifier(self.data.num_classes)  # type: ignore[operator]
            progress.note(f"new head: {head_classes} -> {self.data.num_classes} classes")
        self.loaded.model_kwargs["num_classes"] = self.data.num_classes
        self.method = get_method(config.method)
        prepared = prepare_for_training(model, config, self._activation_ranks, progress.note)
        self.targets, self.bsr_plan = prepared.targets, prepared.bsr_plan
        self.compress_report = prepared.compress_report
        self.act_ranks, self.calibration = prepared.act_ranks, prepared.calibration
        self.model = model.train()
        self.opt = SubspaceSGD(model, config.lr, config.momentum, config.weight_decay, config.clip)
        self.steps_per_epoch = math.ceil(len(self.data.train) / config.batch_size)  # type: ignore[arg-type]
        if config.max_steps is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, config.max_steps)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.opt.sgd, T_max=config.epochs * self.steps_per_epoch, eta_min=config.lr_min
        )
        self.history: list[dict[str, Any]] = []
        self.step_times: list[float] = []
        self.saved_total: list[int] = []
        self.saved_targets: list[int] = []
        self.act_shapes: dict[str, tuple[int, ...]] = {}
        self.start_epoch = 0
        self.resume_step = 0  # steps of start_epoch already done (a checkpoint made by Ctrl-C)
        self.partial = [0.0, 0.0, 0.0, 0.0]
        self.stop_requested = False

    def _calibration_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = _epoch_order(len(self.data.train), self.config.seed, 0)  # type: ignore[arg-type]
        images, labels = next(iter(_loader(self.data.train, self.config.batch_size, order)))
        return self.transform(images), labels

    def _activation_ranks(
        self, targets: list[str]
    ) -> tuple[dict[str, tuple[int, ...]], dict[str, Any] | None]:
        cfg = self.config
        if cfg.act_ranks is not None:
            return {n: tuple(cfg.act_ranks) for n in targets}, {"rule": "explicit"}
        x, y = self._calibration_batch()
        start = time.perf_counter()
        if cfg.act_budget_mb is not None:
            captured = capture(self.loaded.model, targets, x, y, F.cross_entropy)
            choice = ranks_under_budget(captured, cfg.act_budget_mb)
            info = {
                "rule": "budget",
                "budget_mib": cfg.act_budget_mb,
                "memory_mib": choice.memory_mb,
                "summed_gradient_error": choice.error,
                "eps_per_layer": choice.eps,
            }
            ranks = choice.ranks
        else:
            assert cfg.act_eps is not None
            inputs = {n: a for n, (a, _) in capture(self.loaded.model, targets, x).items()}
            ranks = ranks_by_eps(inputs, cfg.act_eps)
            info = {"rule": "eps", "act_eps": cfg.act_eps}
        info.update(batch=len(y), seconds=round(time.perf_counter() - start, 3))
        self.progress.note(f"activation ranks by {info['rule']} on one batch of {len(y)}")
        return ranks, info

    # -- checkpoints ------------------------------------------------------------------------
    def _layer_states(self) -> dict[str, Any]:
        return {
            n: m.act.state_dict()
            for n, m in self.model.named_modules()
            if isinstance(m, (WASILinear, ASILinear)) and m.act is not None
        }

    def save_checkpoint(
        self, epoch: int, step: int = 0, partial: list[float] | None = None
    ) -> None:
        """State after epoch index ``epoch`` finished and ``step`` steps of the next one
        (``partial``: that epoch's loss sum, correct count, samples seen, seconds so far)."""
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "epoch": epoch,
            "step": step,
            "partial": partial or [0.0, 0.0, 0.0, 0.0],
            "config": self.config.to_dict(),
            "data": self.data_spec,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "activation_bases": self._layer_states(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "step_times": self.step_times,
            "saved_total": self.saved_total,
            "saved_targets": self.saved_targets,
            "act_shapes": {k: list(v) for k, v in self.act_shapes.items()},
        }
        _atomic_torch_save(state, self.ckpt_dir / CHECKPOINT)

    def restore(self) -> None:
        path = self.ckpt_dir / CHECKPOINT
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise WasiToolError(f"nothing to resume: no checkpoint at {path}") from None
        except Exception as exc:  # a truncated or foreign file
            raise WasiToolError(f"cannot read checkpoint {path}: {exc}") from None
        if state.get("config") != self.config.to_dict() or state.get("data") != self.data_spec:
            raise WasiToolError(
                f"checkpoint {path} was made with other settings or data; resume with the same "
                "command, or start again with --overwrite"
            )
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        for name, layer_state in state["activation_bases"].items():
            self.model.get_submodule(name).act.load_state_dict(layer_state)  # type: ignore[union-attr]
        torch.set_rng_state(state["torch_rng"])
        self.history = list(state["history"])
        self.step_times = list(state["step_times"])
        self.saved_total = list(state["saved_total"])
        self.saved_targets = list(state["saved_targets"])
        self.act_shapes = {k: tuple(v) for k, v in state["act_shapes"].items()}
        self.start_epoch = int(state["epoch"]) + 1
        self.resume_step = int(state["step"])
        self.partial = [float(v) for v in state["partial"]]
        where = f"epoch {self.start_epoch}" + (
            f", step {self.resume_step}" if self.resume_step else ""
        )
        self.progress.note(f"resumed after {where} from {path}")

    # -- training ---------------------------------------------------------------------------
    def _record_shapes(self) -> list[Any]:
        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], name: str) -> None:
            self.act_shapes.setdefault(name, tuple(args[0].shape))

        return [
            self.model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n))
            for n in self.targets
        ]

    def _request_stop(self, signum: int, frame: object) -> None:
        self.stop_requested = True  # acted on at the end of the current step

    def train(self) -> None:
        """Train the remaining epochs; Ctrl-C finishes the step, checkpoints it, and raises
        KeyboardInterrupt, so a resumed run continues from exactly that step."""
        cfg = self.config
        meter = SavedBytesMeter(self.model, self.targets)
        shape_hooks = self._record_shapes()
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._request_stop) if in_main else None
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                self._train_epoch(epoch, meter)
                self.save_checkpoint(epoch)
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)
            meter.remove()
            for h in shape_hooks:
                h.remove()

    def _train_epoch(self, epoch: int, meter: SavedBytesMeter) -> None:
        cfg = self.config
        self.model.train()
        order = _epoch_order(len(self.data.train), cfg.seed, epoch)  # type: ignore[arg-type]
        self.progress.start_epoch(epoch, cfg.epochs, self.steps_per_epoch)
        skip = self.resume_step if epoch == self.start_epoch else 0
        loss_sum, correct, seen, before = self.partial if skip else (0.0, 0, 0, 0.0)
        start = time.perf_counter() - before
        for step, (images, labels) in enumerate(_loader(self.data.train, cfg.batch_size, order)):
            if step >= self.steps_per_epoch:
                break
            if step < skip:  # done before the interruption; the order is the same
                continue
            x = self.transform(images)
            t0 = time.perf_counter()
            with meter:
                logits = self.model(x)
            loss = F.cross_entropy(logits, labels)
            where = f"epoch {epoch + 1}, step {step + 1}"
            if not torch.isfinite(loss):
                raise WasiToolError(
                    f"training diverged: loss is {float(loss.detach())} at {where} (first "
                    f"non-finite output: {first_non_finite_output(self.model, x)}); the last good "
                    f"checkpoint is in {self.ckpt_dir}"
                )
            self.opt.zero_grad()
            loss.backward()
            bad = first_non_finite_grad(self.model)
            if bad is not None:
                raise WasiToolError(
                    f"training diverged: non-finite gradient in {bad} at {where}; the last good "
                    f"checkpoint is in {self.ckpt_dir}"
                )
            self.opt.step()
            self.sched.step()
            elapsed = time.perf_counter() - t0
            self.step_times.append(elapsed)
            self.saved_total.append(meter.total)
            self.saved_targets.append(meter.targets)
            batch_loss = float(loss.detach())
            batch_correct = int((logits.argmax(-1) == labels).sum())
            loss_sum += batch_loss * len(labels)
            correct += batch_correct
            seen += len(labels)
            self.progress.step(batch_loss, batch_correct / len(labels), len(labels) / elapsed)
            if self.stop_requested:
                spent = time.perf_counter() - start
                self.save_checkpoint(epoch - 1, step + 1, [loss_sum, correct, seen, spent])
                raise KeyboardInterrupt
        test = evaluate(self.model, self.data.test, self.transform, cfg.batch_size)
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1, seen),
            "train_accuracy": correct / max(1, seen),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "lr_end": self.opt.lr,
            "seconds": round(time.perf_counter() - start, 3),
        }
        self.history.append(record)
        self.progress.end_epoch(record)

    def metrics(self) -> dict[str, Any]:
        cfg = self.config
        times = self.step_times[1:] or self.step_times  # the first step includes warm-up
        median = statistics.median(times) if times else float("nan")
        out: dict[str, Any] = {
            "method": cfg.method,
            "config": cfg.to_dict(),
            "data": self.data.description,
            "classes": self.data.classes,
            "targets": self.targets,
            "weight_ranks": {
                n: int(self.model.get_submodule(n).rank)  # type: ignore[arg-type]
                for n in self.targets
                if isinstance(self.model.get_submodule(n), WASILinear)
            },
            "act_ranks": {n: list(r) for n, r in self.act_ranks.items()},
            "act_calibration": self.calibration,
            "epochs": self.history,
            "final": self.history[-1] if self.history else None,
            "measured": {
                "median_step_seconds": median,
                "images_per_second": cfg.batch_size / median if times else None,
                "steps": len(self.step_times),
                "peak_rss_bytes": peak_rss_bytes(),
                "peak_rss_note": "whole process: loading, data, training and evaluation",
                "saved_bytes_per_step": {
                    "total": statistics.median(self.saved_total) if self.saved_total else None,
                    "targets": statistics.median(self.saved_targets)
                    if self.saved_targets
                    else None,
                    "note": "storages autograd saved for backward in one step, each once, "
                    "parameters excluded (saved_tensors_hooks)",
                },
            },
            "analytic": {
                "note": "per target layer and step; memory in elements (and MiB at fp32), as "
                "method.md section 5; flops_per_step counts 2 per multiply-add and includes the "
                "subspace iterations and core; flops_per_step_reference_code reproduces the WASI "
                "reference code's count (multiply-adds for the low-rank dW, N/I ranks swapped, "
                "no core) for comparison only",
                "layers": _layer_accounting(
                    self.model,
                    self.targets,
                    self.method.layer,
                    self.act_shapes,
                    cfg.lora_rank if self.method.lora else None,
                ),
                "model": self._model_accounting(),
            },
        }
        if self.bsr_plan is not None:
            out["bsr"] = self.bsr_plan.to_dict()
        return out

    def _model_accounting(self) -> dict[str, Any]:
        """Whole-model figures: parameters that train, and (bsr) tokens per block.

        Convention, as the BSR paper counts training memory: all weights, plus a gradient for
        each trainable parameter, plus the activations saved for backward; blocks before the
        first trained block save none, and each later block saves activations for its own
        token count after dropping. The saved activations are the measured figure above.
        """
        params = list(self.model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        row: dict[str, Any] = {
            "parameters": sum(p.numel() for p in params),
            "trainable_parameters": trainable,
            "gradient_elements": trainable,
            "note": "trainable_parameters includes WASI factors L, R (parameters updated by WSI, "
            "not autograd); gradient_elements: one gradient element per trainable parameter "
            "(for WASI the factors' size; the dense gradient is never formed)",
        }
        if self.bsr_plan is not None:
            x, _ = self._calibration_batch()
            was_training = self.model.training
            self.model.eval()
            row["tokens_per_block"] = tokens_per_block(self.model, x[:1])
            self.model.train(was_training)
            first = self.bsr_plan.trained[0]
            row["blocks_saving_activations"] = list(range(first, len(self.bsr_plan.blocks)))
            row["convention"] = (
                "BSR paper: weights + gradients of trainable parameters + saved activations, "
                "none before the first trained block, token counts after dropping"
            )
        return row


def _ckpt_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.ckpt"


def run_finetune(
    source: ModelSource,
    data: str | Path,
    config: FinetuneConfig,
    out: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Fine-tune and write an artifact (weights, manifest, report, metrics) at ``out``.

    Each epoch's state goes to ``<out>.ckpt/last.pt`` (atomically); ``resume`` continues from
    it. The checkpoint directory is removed once the artifact is written.
    """
    out = Path(out)
    progress = progress or _Silent()
    ckpt_dir = _ckpt_dir(out)
    if resume and overwrite:
        raise WasiToolError("--resume continues a run; --overwrite starts it again: pick one")
    if not resume:
        artifacts.check_output_dir(out, overwrite)
        if ckpt_dir.exists():
            if not overwrite:
                raise WasiToolError(
                    f"an interrupted run left {ckpt_dir}; pass --resume to continue it or "
                    "--overwrite to start again"
                )
            shutil.rmtree(ckpt_dir)
    elif out.exists():
        raise WasiToolError(f"output {out} already exists: that run has finished")
    run = _Run(source, data, config, ckpt_dir, progress)
    if resume:
        run.restore()
    run.train()
    metrics = run.metrics()
    finalize_(run.model)
    run.model.eval()
    stages = [{"stage": "finetune", "config": config.to_dict(), "data": run.data.description}]
    if run.compress_report is not None:
        stages.insert(0, {"stage": "compress", "config": run.compress_report["config"]})
    layers = [
        {
            "name": n,
            "rank": metrics["weight_ranks"].get(n),
            "act_ranks": metrics["act_ranks"].get(n),
        }
        for n in run.targets
    ]

    def add_metrics(staging: Path) -> None:
        artifacts.write_json(staging / METRICS, metrics)

    report = {"stage": "finetune", "final": metrics["final"], "measured": metrics["measured"]}
    files = write_stage_artifact(
        run.loaded, out, stages, layers, report, extra=add_metrics, overwrite=overwrite
    )
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return FinetuneResult(run.loaded, out, metrics, files)
