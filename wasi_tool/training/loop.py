"""The training loop: one ``train_step`` for finetune, the training bench and any other caller,
evaluation, divergence diagnostics, and the epoch loop with checkpoints and Ctrl-C."""

from __future__ import annotations

import contextlib
import math
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from wasi_tool.errors import WasiToolError
from wasi_tool.measure import SavedBytesMeter, peak_rss_bytes
from wasi_tool.methods import Method, NonFiniteLoss, get_method, gradient_step
from wasi_tool.methods.optim import NonFiniteGradient, first_non_finite_grad
from wasi_tool.training import checkpoint
from wasi_tool.training.config import FinetuneConfig
from wasi_tool.training.loss import count_correct, task_loss
from wasi_tool.training.progress import Progress
from wasi_tool.training.results import EpochRecord, Measured, SavedBytes


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: the step in progress finished and the state after it is saved,
    so ``--resume`` continues with the next step."""

    def __init__(self, ckpt_dir: Path, epoch: int, step: int, steps_per_epoch: int) -> None:
        super().__init__(ckpt_dir, epoch, step, steps_per_epoch)
        self.ckpt_dir, self.epoch, self.step = ckpt_dir, epoch, step
        self.steps_per_epoch = steps_per_epoch

    def __str__(self) -> str:
        return (
            f"the state after step {self.step} of {self.steps_per_epoch} in epoch {self.epoch} "
            f"is saved in {self.ckpt_dir}/; --resume continues from step {self.step + 1}"
        )


@dataclass
class StepResult:
    """One optimisation step: the loss, the logits, its wall time and the bytes saved for
    backward (when a meter was given)."""

    loss: float
    logits: torch.Tensor
    seconds: float
    saved_total: int = 0
    saved_targets: int = 0


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    method: Method | None = None,
    scheduler: Any = None,
    meter: SavedBytesMeter | None = None,
    where: str = "",
    hint: str = "",
) -> StepResult:
    """One step of ``method`` (default: forward, ``task_loss``, backward, optimiser step), then
    the scheduler.

    A non-finite loss or gradient is a WasiToolError naming the first module (in execution
    order) whose output is not finite, or the first parameter (or WASI gradient factor) whose
    gradient is not; nothing is updated then. A finite gradient whose update makes a weight
    non-finite (an absurd learning rate) is one too, naming that parameter. ``where`` and
    ``hint`` are added to the message. ``meter`` counts what the step's forward saves.
    """
    start = time.perf_counter()
    at = f" at {where}" if where else ""
    forward = (lambda: meter) if meter is not None else contextlib.nullcontext
    try:
        if method is None:
            out = gradient_step(model, optimizer, x, y, task_loss, forward)
        else:
            out = method.step(model, optimizer, x, y, task_loss, forward)
    except NonFiniteLoss as exc:
        raise WasiToolError(
            f"training diverged: loss is {exc.value}{at} (first non-finite output: "
            f"{first_non_finite_output(model, x)}){hint}"
        ) from None
    except NonFiniteGradient:
        where_grad = first_non_finite_grad(model) or "the gradient norm"
        raise WasiToolError(
            f"training diverged: non-finite gradient in {where_grad}{at}{hint}"
        ) from None
    bad = first_non_finite_param(model)
    if bad is not None:
        raise WasiToolError(
            f"training diverged: weight {bad} is not finite after the step{at}{hint}"
        )
    if scheduler is not None:
        scheduler.step()
    seconds = time.perf_counter() - start
    saved = (meter.total, meter.targets) if meter is not None else (0, 0)
    return StepResult(float(out.loss), out.logits, seconds, *saved)


def loader(ds: Dataset[Any], batch_size: int, order: list[int] | None = None) -> DataLoader[Any]:
    return DataLoader(ds, batch_size=batch_size, sampler=order, shuffle=False, num_workers=0)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a function of (seed, epoch) only, so a resumed run sees
    the same batches as an uninterrupted one."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    ds: Dataset[Any],
    transform: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    predictions: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy over ``ds`` in eval mode (a causal LM: per
    predicted token, prompt and padding left out); ``predictions`` collects each batch's
    (top-1, labels) when given."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in loader(ds, batch_size):
        logits = model(transform(images))
        if predictions is not None:
            predictions.append((logits.argmax(-1), labels))
        loss_sum += float(task_loss(logits, labels, reduction="sum"))
        hits, counted = count_correct(logits, labels)
        correct += hits
        count += counted
    model.train(was_training)
    return {"loss": loss_sum / max(1, count), "accuracy": correct / max(1, count)}


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


def first_non_finite_param(model: nn.Module) -> str | None:
    """Name of the first trainable parameter holding a NaN or inf, else None. One fused
    max-abs per tensor (``torch._foreach_norm`` with ord inf, NaN propagating) and one check,
    so it is cheap enough for every step; the names are looked up only when one is bad."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return None
    with torch.no_grad():
        peaks = torch._foreach_norm([p.detach() for _, p in named], float("inf"))
        finite = torch.isfinite(torch.stack([t.float() for t in peaks]))
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


@dataclass
class Trainer:
    """The epochs of one run: data order, steps, evaluation, checkpoints and Ctrl-C.

    A checkpoint after every epoch (and at Ctrl-C, after the current step) holds the model's
    state dict (ASI bases included), the optimiser, the scheduler, the RNG and the history,
    so a resumed run continues exactly.
    """

    model: nn.Module
    targets: list[str]
    config: FinetuneConfig
    train_set: Dataset[Any]
    test_set: Dataset[Any]
    transform: Callable[[torch.Tensor], torch.Tensor]
    ckpt_dir: Path
    progress: Progress
    identity: checkpoint.RunIdentity  # what a checkpoint must match to be resumed
    history: list[EpochRecord] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    saved_total: list[int] = field(default_factory=list)
    saved_targets: list[int] = field(default_factory=list)
    act_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    start_epoch: int = 0
    resume_step: int = 0  # steps of start_epoch already done (a checkpoint made by Ctrl-C)
    partial: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    stop_requested: bool = False
    method: Method | None = None  # default: the config's method
    optimizer: torch.optim.Optimizer | None = None  # default: the method's own

    def __post_init__(self) -> None:
        cfg = self.config
        self.model.train()
        self.method = self.method or get_method(cfg.method)
        self.opt = self.optimizer or self.method.optimizer(self.model, cfg)
        self.steps_per_epoch = steps_per_epoch(len(self.train_set), cfg)  # type: ignore[arg-type]
        self.sched = cosine_schedule(self.opt, cfg, self.steps_per_epoch)

    def calibration_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first batch of epoch 0 (what activation ranks are calibrated on)."""
        return first_batch(self.train_set, self.config, self.transform)

    # -- checkpoints ------------------------------------------------------------------------
    def _state(
        self, epoch: int, step: int, partial: list[float] | None
    ) -> checkpoint.TrainingState:
        return {
            "epoch": epoch,
            "step": step,
            "partial": partial or [0.0, 0.0, 0.0, 0.0],
            **self.identity,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": [r.__dict__ for r in self.history],
            "step_times": self.step_times,
            "saved_total": self.saved_total,
            "saved_targets": self.saved_targets,
            "act_shapes": {k: list(v) for k, v in self.act_shapes.items()},
        }

    def save_checkpoint(
        self, epoch: int, step: int = 0, partial: list[float] | None = None
    ) -> None:
        """State after epoch index ``epoch`` finished and ``step`` steps of the next one
        (``partial``: that epoch's loss sum, correct count, samples seen, seconds so far)."""
        state = self._state(epoch, step, partial)
        checkpoint.save(self.ckpt_dir, state, checkpoint.fingerprint(self.model, self.identity))

    def _divergence_hint(self) -> str:
        """What a divergence message says about saved state: the checkpoint only if one is
        there (none before the first epoch ends), and what to change."""
        if (self.ckpt_dir / checkpoint.FILE).is_file():
            return f"; the last good checkpoint is in {self.ckpt_dir}/ (lower the learning rate)"
        return "; nothing was saved (lower the learning rate)"

    def restore(self) -> None:
        path = self.ckpt_dir / checkpoint.FILE
        state = checkpoint.load(self.ckpt_dir, checkpoint.fingerprint(self.model, self.identity))
        try:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            self.history = [EpochRecord(**r) for r in state["history"]]
            self.step_times = list(state["step_times"])
            self.saved_total = list(state["saved_total"])
            self.saved_targets = list(state["saved_targets"])
            self.act_shapes = {k: tuple(v) for k, v in state["act_shapes"].items()}
            self.start_epoch = int(state["epoch"]) + 1
            self.resume_step = int(state["step"])
            self.partial = [float(v) for v in state["partial"]]
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise WasiToolError(f"checkpoint {path} holds an unexpected structure: {exc}") from None
        where = f"epoch {self.start_epoch}" + (
            f", step {self.resume_step}" if self.resume_step else ""
        )
        self.progress.note(f"resumed after {where} from {self.ckpt_dir / checkpoint.FILE}")

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
        meter = SavedBytesMeter(self.model, self.targets)
        shape_hooks = self._record_shapes()
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._request_stop) if in_main else None
        try:
            for epoch in range(self.start_epoch, self.config.epochs):
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
        order = epoch_order(len(self.train_set), cfg.seed, epoch)  # type: ignore[arg-type]
        self.progress.start_epoch(epoch, cfg.epochs, self.steps_per_epoch)
        skip = self.resume_step if epoch == self.start_epoch else 0
        loss_sum, correct, seen, before = self.partial if skip else (0.0, 0, 0, 0.0)
        start = time.perf_counter() - before
        hint = self._divergence_hint()
        for step, (images, labels) in enumerate(loader(self.train_set, cfg.batch_size, order)):
            if step >= self.steps_per_epoch:
                break
            if step < skip:  # done before the interruption; the order is the same
                continue
            where = f"epoch {epoch + 1}, step {step + 1}"
            result = train_step(
                self.model,
                self.opt,
                self.transform(images),
                labels,
                method=self.method,
                scheduler=self.sched,
                meter=meter,
                where=where,
                hint=hint,
            )
            self.step_times.append(result.seconds)
            self.saved_total.append(result.saved_total)
            self.saved_targets.append(result.saved_targets)
            batch_correct, counted = count_correct(result.logits, labels)
            loss_sum += result.loss * counted
            correct += batch_correct
            seen += counted
            self.progress.step(
                result.loss, batch_correct / max(1, counted), len(labels) / result.seconds
            )
            if self.stop_requested:
                spent = time.perf_counter() - start
                self.save_checkpoint(epoch - 1, step + 1, [loss_sum, correct, seen, spent])
                raise Interrupted(self.ckpt_dir, epoch + 1, step + 1, self.steps_per_epoch)
        test = evaluate(self.model, self.test_set, self.transform, cfg.batch_size)
        if not math.isfinite(test["loss"]):  # the weights are finite but useless: not "good"
            raise WasiToolError(
                f"training diverged: the held-out loss is {test['loss']} at the end of epoch "
                f"{epoch + 1}, step {self.steps_per_epoch} (not checkpointed)"
                f"{self._divergence_hint()}"
            )
        record = EpochRecord(
            epoch=epoch + 1,
            train_loss=loss_sum / max(1, seen),
            train_accuracy=correct / max(1, seen),
            test_loss=test["loss"],
            test_accuracy=test["accuracy"],
            lr_end=float(self.opt.param_groups[0]["lr"]),
            seconds=round(time.perf_counter() - start, 3),
        )
        self.history.append(record)
        self.progress.end_epoch(record)

    def measured(
        self, floor_rss_bytes: int | None = None, allocator: str | None = None
    ) -> Measured:
        times = self.step_times[1:] or self.step_times  # the first step includes warm-up
        median = statistics.median(times) if times else float("nan")
        deciles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else []
        return Measured(
            median_step_seconds=median,
            p10_step_seconds=deciles[0] if deciles else None,
            p90_step_seconds=deciles[-1] if deciles else None,
            images_per_second=self.config.batch_size / median if times else None,
            steps=len(self.step_times),
            peak_rss_bytes=peak_rss_bytes(),
            saved_bytes_per_step=SavedBytes(
                statistics.median(self.saved_total) if self.saved_total else None,
                statistics.median(self.saved_targets) if self.saved_targets else None,
            ),
            floor_rss_bytes=floor_rss_bytes,
            allocator=allocator,
        )


def steps_per_epoch(samples: int, config: FinetuneConfig) -> int:
    """Optimiser steps in one epoch of ``samples`` (capped by ``max_steps``)."""
    steps = math.ceil(samples / config.batch_size)
    return min(steps, config.max_steps) if config.max_steps is not None else steps


def cosine_schedule(
    optimizer: torch.optim.Optimizer, config: FinetuneConfig, per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The recipe's learning rate: a cosine from ``lr`` to ``lr_min`` over all steps."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * per_epoch, eta_min=config.lr_min
    )


def first_batch(
    train_set: Dataset[Any],
    config: FinetuneConfig,
    transform: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    order = epoch_order(len(train_set), config.seed, 0)  # type: ignore[arg-type]
    images, labels = next(iter(loader(train_set, config.batch_size, order)))
    return transform(images), labels
