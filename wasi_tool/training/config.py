"""The settings of a training run: the finetune stage's config, composed of parts that the
federated config, the training bench and recipes share (each field declared once), and the
method's own options object (``methods.options``)."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Self

from wasi_tool.config import StageConfig, register_config
from wasi_tool.errors import WasiToolError
from wasi_tool.methods import MethodOptions, get_method, methods_with, option_keys, options_classes
from wasi_tool.models.targets import check_patterns
from wasi_tool.nn.lossy import LOSSY
from wasi_tool.ops import DEFAULT_EPS, check_eps
from wasi_tool.ops.tucker import ASI_ORDERS
from wasi_tool.ops.wsi import UPDATE_FORMS

MEMORY_MODES = ("off", "block", "mlp", "attn")
AUTO = "auto"  # training.session.AUTO: vanilla, wsi or wasi, whichever fits a memory budget


@dataclass
class TrainSettings:
    """What every training run names (finetune, federate, the training bench): the method and
    its targets, the weight rank rule, the batch and the seed. ``seq_len`` None: 128 tokens.
    See FinetuneConfig for each field."""

    method: str = "wasi"
    targets: str | None = None
    eps: float = DEFAULT_EPS
    batch_size: int = 32
    seq_len: int | None = None
    seed: int = 233

    def check_settings(self) -> None:
        """The checks every training run shares (the method names are each config's own)."""
        check_patterns(self.targets, "targets")
        self.eps = check_eps(self.eps, "eps")
        if int(self.batch_size) < 1:
            raise WasiToolError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.seq_len is not None and self.seq_len < 2:
            raise WasiToolError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.seed < 0:  # torch.Generator.manual_seed and the data order need it >= 0
            raise WasiToolError(f"seed must be >= 0, got {self.seed}")


@dataclass
class ActivationRanks:
    """How the activation ranks of the compressed-activation methods (asi, wasi, bsr+wasi,
    asi-fixed, wasi-fixed) are chosen, and how their activations are compressed: shared by
    finetune, federate and the training bench. See FinetuneConfig for each field."""

    act_ranks: list[int] | None = None
    act_eps: float | None = None
    act_budget_mb: float | None = None
    act_order: str = "sequential"
    act_residual_rows: int = 0

    def check_activation_ranks(self) -> None:
        if self.act_ranks is not None:
            self.act_ranks = [int(r) for r in self.act_ranks]
            if len(self.act_ranks) not in (3, 4) or min(self.act_ranks) < 1:
                raise WasiToolError(
                    f"act_ranks takes 3 (B, N, C) or 4 (B, H, W, C) positive ranks, "
                    f"got {self.act_ranks}"
                )
        given = [
            k for k in ("act_ranks", "act_eps", "act_budget_mb") if getattr(self, k) is not None
        ]
        if len(given) > 1:
            raise WasiToolError(f"give one of act_ranks, act_eps, act_budget_mb (got {given})")
        if self.act_eps is not None:
            self.act_eps = check_eps(self.act_eps, "act_eps")
        if self.act_budget_mb is not None and not self.act_budget_mb > 0:
            raise WasiToolError(f"act_budget_mb must be positive, got {self.act_budget_mb}")
        if int(self.act_residual_rows) < 0:
            raise WasiToolError(f"act_residual_rows must be >= 0, got {self.act_residual_rows}")
        if self.act_order not in ASI_ORDERS:
            raise WasiToolError(f"act_order must be one of {ASI_ORDERS}, got {self.act_order!r}")


@dataclass
class MemorySettings:
    """What memory a training step keeps outside the method's own savings: recompute regions,
    a whole-process budget, lossy storage. Shared by finetune, federate and the training bench.
    See FinetuneConfig for each field."""

    memory_mode: str = "off"
    memory_budget: str | None = None
    lossy: str = "off"

    @property
    def saves_memory(self) -> bool:
        """The run recomputes, plans or stores lossily (its workers follow live memory)."""
        return self.memory_mode != "off" or self.memory_budget is not None or self.lossy != "off"

    def check_memory(self) -> None:
        if self.memory_mode not in MEMORY_MODES:
            raise WasiToolError(
                f"memory_mode must be one of {', '.join(MEMORY_MODES)}, got {self.memory_mode!r}"
            )
        if self.memory_budget is not None:
            from wasi_tool.training.plan import parse_size

            parse_size(self.memory_budget)
            if self.memory_mode != "off":
                raise WasiToolError("give memory_budget or memory_mode, not both")
        if self.lossy not in LOSSY:
            raise WasiToolError(f"lossy must be one of {', '.join(LOSSY)}, got {self.lossy!r}")
        if self.lossy != "off" and self.memory_mode == "block":
            raise WasiToolError(
                "lossy storage with memory_mode block: a recomputed block stores nothing to "
                "keep lossily (use mlp or attn, or a memory budget)"
            )


@dataclass
class FactoringSettings:
    """How the factored-weight methods (wsi, wasi, bsr+wasi, wasi-fixed) factor dense targets
    and update their factors. See FinetuneConfig for each field."""

    calibrate: int | None = None
    eps_spectrum: str = "weight"
    update_form: str = "projection"

    def check_factoring(self) -> None:
        if self.calibrate is not None and int(self.calibrate) < 1:
            raise WasiToolError(f"calibrate takes a sample count >= 1, got {self.calibrate}")
        if self.eps_spectrum not in ("weight", "output"):  # transforms.compress.EPS_SPECTRA
            raise WasiToolError(f"eps_spectrum must be weight or output, got {self.eps_spectrum!r}")
        if self.update_form not in UPDATE_FORMS:
            raise WasiToolError(
                f"update_form must be one of {UPDATE_FORMS}, got {self.update_form!r}"
            )


@dataclass
class RecipeSettings:
    """The optimisation recipe (the paper's defaults): epochs, a cosine learning rate from lr
    to lr_min, momentum, weight decay and the global gradient-norm clip. Shared by finetune and
    federate (and read by ``wasi_tool.prepare``). See FinetuneConfig for each field."""

    epochs: int = 5
    lr: float = 0.05
    lr_min: float = 0.005
    momentum: float = 0.0
    weight_decay: float = 1e-4
    clip: float | None = 2.0

    def check_recipe(self) -> None:
        if int(self.epochs) < 1:
            raise WasiToolError(f"epochs must be >= 1, got {self.epochs}")
        for name in ("lr", "lr_min", "weight_decay", "momentum"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise WasiToolError(f"{name} must be a finite number >= 0, got {value}")
        if self.lr <= 0 or self.lr_min > self.lr:
            raise WasiToolError(f"need 0 < lr_min <= lr, got lr={self.lr}, lr_min={self.lr_min}")
        if self.clip is not None and not self.clip > 0:
            raise WasiToolError(f"clip must be positive (or None for no clipping), got {self.clip}")


@dataclass
class TaskSettings:
    """What a run trains on and how it is checked: the held-out share, the classes kept, the
    step cap, the causal-LM exact-match examples and a fresh head. Shared by finetune and
    federate. See FinetuneConfig for each field."""

    val_fraction: float = 0.1
    classes: list[int] | None = None
    max_steps: int | None = None
    eval_examples: int = 32
    new_head: bool = False

    def check_task(self) -> None:
        if self.eval_examples < 0:
            raise WasiToolError(f"eval_examples must be >= 0, got {self.eval_examples}")
        if self.max_steps is not None and self.max_steps < 1:
            raise WasiToolError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0.0 < self.val_fraction < 1.0:
            raise WasiToolError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


def split_options(
    values: dict[str, object], methods: list[str]
) -> dict[type[MethodOptions], dict[str, object]]:
    """Take the flat method-option keys (``lora_rank``...) out of ``values``, grouped by their
    options class. A key of a method not in ``methods`` is refused unless it holds its default
    (configs stored before per-method options wrote every method's options)."""
    keys = option_keys()
    own = {spec.options for spec in (get_method(m) for m in methods if m != AUTO)}
    grouped: dict[type[MethodOptions], dict[str, object]] = {}
    for key in [k for k in values if k in keys]:
        cls, value = keys[key], values.pop(key)
        if cls not in own:
            if value == cls.flat_defaults()[key]:
                continue
            raise WasiToolError(
                f"{key} is a setting of {', '.join(methods_with(cls))}, not of method "
                f"{', '.join(methods)}"
            )
        grouped.setdefault(cls, {})[key] = value
    return grouped


def option_hints() -> dict[str, object]:
    """Every registered method's flat option keys and their types."""
    return {key: hint for cls in options_classes() for key, hint in cls.flat_hints().items()}


@register_config
@dataclass
class FinetuneConfig(
    StageConfig,
    TaskSettings,
    RecipeSettings,
    FactoringSettings,
    MemorySettings,
    ActivationRanks,
    TrainSettings,
):
    """How to fine-tune.

    Args:
        method: vanilla, asi, wsi, wasi, bsr, bsr+wasi, lora (or another registered
            method), or "auto" with a memory_budget: the first of vanilla, wsi, wasi whose
            plan fits (exact gradients first; the choice and why are in the memory plan).
        targets: layers the method acts on: a preset or globs as in compress; by default the
            model's factored layers, or the MLP linears when it has none.
        eps: weight rank rule for wsi/wasi targets that are still dense (factored first).
        calibrate: factor those dense targets in the metric of their inputs on this many
            training samples (SVD-LLM's whitening, as ``compress --calibrate``); None: plain
            SVD.
        eps_spectrum: with calibrate, what eps reads: "weight" (plain SVD's rank, calibrated
            truncation) or "output" (the whitened spectrum), as CompressConfig.
        act_ranks: explicit per-mode activation ranks, e.g. 16,12,32 for (B, N, C).
        act_eps: activation ranks by the energy rule on a calibration batch (HOSVD).
        act_budget_mb: per-layer activation ranks minimising the gradient error within this
            many MiB of saved activations (dynamic programming on a calibration batch).
            Without any of the three, act_eps = eps.
        act_order: ASI mode order, "sequential" (one HOOI sweep) or "parallel" (reference).
        act_residual_rows: asi/wasi: m sampled rows of the activation's residual A - A~ kept
            per layer, scaled so that the weight gradient is unbiased (an experiment,
            docs/unbiased.md: it measured worse than plain ASI at the same memory; 0: off).
        update_form: WSI update, "projection" (R' = L'^T W') or "paper" (R' = L^T W').
        epochs: passes over the training data.
        batch_size: examples per training step.
        lr: the learning rate at the start: it follows a cosine from lr to lr_min over all
            steps.
        lr_min: the floor of the cosine schedule.
        momentum: SGD momentum (0 for wsi/wasi: the WSI update has none).
        weight_decay: SGD weight decay.
        clip: the global gradient-norm clip (None, or 0 on the command line: no clipping).
        seed: the training seed (data order, new heads, bases).
        val_fraction: held-out share when the dataset has no test split.
        classes: train on these classes only, e.g. 5,6,7 (relabelled 0..n-1).
        max_steps: stop each epoch after this many steps (quick runs).
        seq_len: causal-LM data: tokens per .txt chunk, and the most an example keeps
            (default 128).
        eval_examples: causal LM with prompt/response data: held-out examples whose greedy
            answer is checked by exact match, before and after training (0: none).
        options: the method's own options (``LoraOptions``, ``BsrOptions``, ``MezoOptions``:
            the class its spec names, in its module; None: the method's defaults, or a method
            without options). Recipes, stored configs and ``from_flat`` give them as flat keys
            (``lora_rank``, ``bsr_blocks``, ``keep_rate``, ``mezo_mu``...).
        new_head: a fresh classifier even when the class count matches (a new task).
        memory_mode: what the model saves outside the targets: "off" (autograd saves what
            each op needs), or recompute instead of save, exactly (same gradients): "block"
            keeps only each block's input and re-runs the block in backward; "mlp" / "attn"
            re-run only that half of each block.
        memory_budget: the whole process's peak, e.g. "1.2GB": a plan predicts each part
            and picks the least recompute that fits (memory_mode must then be "off"), or
            refuses naming the minimum.
        lossy: "off" (default: every saved tensor exact) or "bf16": the norms' and GELUs'
            saved inputs outside recompute regions are kept in bfloat16 (nn/lossy.py); with
            a budget, "bf16" allows the plan to use it.
        match_memory: a finished finetune run (its directory): choose this run's activation
            ranks (asi, wasi, bsr+wasi, the fixed-subspace variants) or LoRA rank (lora,
            lora-fa) so that its training memory (saved bytes + weights + gradients) comes as
            close to that run's as the setting allows without exceeding it
            (training/match.py); replaces act_eps / lora_rank.
    """

    stage: ClassVar[str] = "finetune"

    options: MethodOptions | None = None
    match_memory: str | None = None

    def __post_init__(self) -> None:
        if self.method == AUTO:  # training.session.AUTO: vanilla, wsi or wasi under a budget
            if self.memory_budget is None:
                raise WasiToolError(
                    "method auto chooses the method that fits a memory budget: give "
                    "memory_budget (--memory-budget), or name a method"
                )
            spec = get_method("wasi")  # the candidates' checks: wasi's are the strictest
            own = None
        else:
            spec = get_method(self.method)
            own = spec.options
        if self.options is None and own is not None:
            self.options = own()
        elif self.options is not None:
            if type(self.options) is not own:
                raise WasiToolError(
                    f"method {self.method} takes "
                    f"{own.__name__ if own else 'no options'}, got {type(self.options).__name__}"
                )
            self.options.check()
        self.check_settings()
        self.check_activation_ranks()
        self.check_memory()
        self.check_factoring()
        self.check_recipe()
        self.check_task()
        ranked = (self.act_ranks, self.act_eps, self.act_budget_mb)
        if spec.compressed_activations and all(v is None for v in ranked):
            self.act_eps = self.eps
        if self.match_memory is not None:
            self.match_memory = str(self.match_memory)
            clash = [
                k
                for k in ("act_ranks", "act_budget_mb", "memory_budget")
                if getattr(self, k) is not None
            ]
            if self.method == AUTO or clash:
                raise WasiToolError(
                    "match_memory chooses the ranks that meet another run's memory: give it "
                    f"without {', '.join(clash) or 'method auto'}"
                )
            if not (spec.compressed_activations or spec.adapter):
                raise WasiToolError(
                    f"match_memory: method {spec.name} has no setting that sets its training "
                    "memory (activation ranks: asi, wasi, bsr+wasi, asi-fixed, wasi-fixed; "
                    "LoRA rank: lora, lora-fa); run it at its own memory"
                )
        if spec.factored_weight and self.momentum != 0:
            raise WasiToolError(
                "the WSI update has no momentum (the paper uses 0): set momentum 0 for wsi/wasi"
            )

    @classmethod
    def from_flat(cls, data: Mapping[str, object] | None = None, /, **flat: object) -> Self:
        """The config from flat settings (``data`` and keyword arguments): its fields, and the
        method's options by their flat keys, e.g. ``FinetuneConfig.from_flat(method="lora",
        lora_rank=4)``, the same as ``FinetuneConfig(method="lora",
        options=LoraOptions(rank=4))``. A key of another method's options is refused (unless
        it holds its default, as configs stored before per-method options have them)."""
        values = {**(data or {}), **flat}
        method = str(values.get("method", cls.method))
        grouped = split_options(values, [method])
        if grouped:
            if values.get("options") is not None:
                raise WasiToolError("give the method's options as options= or flat keys, not both")
            ((options_cls, given),) = grouped.items()
            values["options"] = options_cls.from_flat(given)
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def from_settings(cls, data: Mapping[str, object]) -> Self:
        return cls.from_flat(data)

    @classmethod
    def setting_hints(cls) -> dict[str, object]:
        """The flat settings: the fields but ``options``, and every method's option keys."""
        hints = super().setting_hints()
        hints.pop("options")
        return {**hints, **option_hints()}

    def settings(self) -> dict[str, object]:
        """The flat settings: the fields, then the method's options under their flat keys."""
        out = {
            f.name: copy.deepcopy(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name != "options"
        }
        return {**out, **(self.options.to_flat() if self.options is not None else {})}
