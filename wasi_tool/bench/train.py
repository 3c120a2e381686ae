"""Training-step benchmark: each method in a fresh subprocess, synthetic input of the model's shape.

The worker (``python -m wasi_tool.bench.train_worker``) loads the model, prepares the method, runs
warm-up then timed steps (forward, backward, update), and prints one JSON object: the median
step time, the peak RSS of its own process (VmHWM, which an exec starts afresh), the library
floor (resident size with the model loaded, less its weights), the bytes saved for backward per
step, and the high-water mark of live tensors in one more step (a dispatch-mode meter).
Its workers start on tcmalloc, else jemalloc, when one is installed (``allocator``,
wasi_tool/allocator.py), every method alike, so their resident memory follows live memory.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

from wasi_tool.allocator import check_allocator, worker_env
from wasi_tool.config import StageConfig, register_config
from wasi_tool.errors import WasiToolError
from wasi_tool.methods import METHODS, MethodOptions, option_keys, options_classes
from wasi_tool.safe_read import read_json
from wasi_tool.threads import check_threads, use_threads
from wasi_tool.training.config import (
    ActivationRanks,
    FinetuneConfig,
    MemorySettings,
    TrainSettings,
    option_hints,
    split_options,
)
from wasi_tool.training.results import METRICS

if TYPE_CHECKING:
    from wasi_tool.training.plan import MemoryPlanRecord

SCHEMA = "wasi-tool-bench-train/2"


@register_config
@dataclass
class TrainBenchConfig(StageConfig, MemorySettings, ActivationRanks, TrainSettings):
    """One training-step measurement: the parts of finetune's settings a step is made of
    (TrainSettings, ActivationRanks, MemorySettings: declared once, with finetune's defaults),
    the methods' options, the model source (its fields mirror ModelSource) and the bench's own
    step counts, allocator and threads.

    ``method`` may name several methods, comma-separated; each runs in a fresh process.
    ``method_options`` holds the options of every registered method that has some (flat keys
    in recipes and stored results, as finetune's); each method's run takes its own.

    Args:
        checkpoint: the checkpoint or artifact to train (None: ``arch`` with random_init).
        arch: the architecture (as ModelSource).
        num_classes: the classifier's class count (as ModelSource).
        img_size: the input size (as ModelSource).
        random_init: random weights instead of a checkpoint.
        act_ranks_by_layer: activation ranks per target layer, e.g. those a fine-tune
            calibrated (``settings_of``); wins over act_ranks.
        settings_from: where act_ranks_by_layer came from (the tables print it).
        steps: timed training steps.
        warmup: warm-up steps before the timed ones.
        allocator: the workers' allocator: auto (tcmalloc, else jemalloc, when installed),
            system, tcmalloc or jemalloc (wasi_tool/allocator.py).
        threads: torch's threads in each worker (None: one per core).
    """

    stage: ClassVar[str] = "bench-train"

    checkpoint: str | None = None
    arch: str | None = None
    num_classes: int | None = None
    img_size: int | None = None
    random_init: bool = False
    act_ranks_by_layer: dict[str, list[int]] | None = None
    settings_from: str | None = None
    steps: int = 20
    warmup: int = 3
    allocator: str = "auto"
    threads: int | None = None
    method_options: list[MethodOptions] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 0:
            raise WasiToolError("steps must be >= 1, warm-up >= 0")
        check_allocator(self.allocator)
        check_threads(self.threads)
        given = {type(o): o for o in self.method_options}
        if len(given) != len(self.method_options):
            raise WasiToolError("method_options holds one options object per options class")
        for options in self.method_options:
            options.check()
        # every registered options class, in the registry's order (the defaults where not given)
        self.method_options = [given.get(cls) or cls() for cls in options_classes()]
        self.check_settings()
        self.check_activation_ranks()
        self.check_memory()

    @classmethod
    def from_flat(cls, data: Mapping[str, object] | None = None, /, **flat: object) -> Self:
        """The config from flat settings: its fields, and any registered method's options by
        their flat keys (``lora_rank``, ``mezo_mu``...): the bench may run several methods."""
        values = {**(data or {}), **flat}
        grouped = split_options(values, list(METHODS))
        if grouped:
            if values.get("method_options"):
                raise WasiToolError("give method_options or flat option keys, not both")
            values["method_options"] = [c.from_flat(g) for c, g in grouped.items()]
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def from_settings(cls, data: Mapping[str, object]) -> Self:
        return cls.from_flat(data)

    @classmethod
    def setting_hints(cls) -> dict[str, object]:
        hints = super().setting_hints()
        hints.pop("method_options")
        return {**hints, **option_hints()}

    def settings(self) -> dict[str, object]:
        out = {
            f.name: copy.deepcopy(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name != "method_options"
        }
        for options in self.method_options:
            out.update(options.to_flat())
        return out

    def options_for(self, method: str) -> MethodOptions | None:
        """A copy of ``method``'s options (None: it has none)."""
        if method not in METHODS:
            return None  # "auto" (its candidates have none); FinetuneConfig names a bad method
        own = METHODS[method].options
        found = [o for o in self.method_options if type(o) is own]
        return copy.deepcopy(found[0]) if found else None

    def method_config(self, method: str | None = None) -> FinetuneConfig:
        """The training settings of ``method`` (default: this config's) for these fields."""
        method = method or self.method
        shared = {
            f.name: copy.deepcopy(getattr(self, f.name))
            for part in (TrainSettings, ActivationRanks, MemorySettings)
            for f in dataclasses.fields(part)
        }
        return FinetuneConfig(**{**shared, "method": method}, options=self.options_for(method))


@dataclass
class StepMeasurement:
    """What one method's worker process measured."""

    method: str
    arch: str | None
    input: list[int]
    targets: int
    act_ranks_first_target: list[int] | None
    trainable_parameters: int
    bsr: dict[str, Any] | None
    steps: int
    warmup: int
    median_step_seconds: float
    p90_step_seconds: float
    peak_rss_bytes: int
    saved_bytes_total: float
    saved_bytes_targets: float
    threads: int
    floor_rss_bytes: int | None = None
    live_tensor_peak_bytes: int | None = None
    memory_mode: str = "off"
    memory_plan: MemoryPlanRecord | None = None
    allocator: str | None = None  # what the worker ran on (wasi_tool/allocator.py)
    wait_policy: str | None = None  # OMP_WAIT_POLICY its torch started with (wasi_tool/threads.py)
    act_ranks_rule: str | None = None  # how the activation ranks were chosen
    min_step_seconds: float | None = None  # the spread beside the median
    p10_step_seconds: float | None = None
    max_step_seconds: float | None = None
    # file-backed resident pages (library code: wasi_tool.measure.file_backed_bytes) at the
    # floor and when the peak was read; their growth is code the steps paged in
    floor_file_bytes: int | None = None
    file_bytes_at_peak: int | None = None
    schema: str = SCHEMA

    @property
    def anon_above_floor_bytes(self) -> int | None:
        """Peak RSS above the floor less the library code the steps paged in: the memory the
        run itself holds (tensors, allocator caches), which a device cannot drop under
        pressure."""
        parts = (self.floor_rss_bytes, self.floor_file_bytes, self.file_bytes_at_peak)
        if any(v is None for v in parts):
            return None
        paged_in = max(0, self.file_bytes_at_peak - self.floor_file_bytes)  # type: ignore[operator]
        return self.peak_rss_bytes - self.floor_rss_bytes - paged_in  # type: ignore[operator]


@dataclass
class Ratios:
    """The baseline's figure over this method's (> 1: this method is faster / smaller)."""

    step_speedup_vs: float
    peak_rss_ratio_vs: float
    saved_bytes_ratio_vs: float
    target_saved_bytes_ratio_vs: float


@dataclass
class TrainBenchResult:
    """Every method's measurement, and the ratios against ``vs``."""

    config: dict[str, Any]
    vs: str | None
    methods: dict[str, StepMeasurement]
    ratios_by_method: dict[str, Ratios] = field(default_factory=dict)
    first: str | None = None  # the method ``ratios`` refers to
    schema: str = SCHEMA

    @property
    def ratios(self) -> Ratios | None:
        return self.ratios_by_method.get(self.first) if self.first else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("first")
        if not self.vs:
            out.pop("ratios_by_method")
        if self.ratios is not None:
            out["ratios"] = asdict(self.ratios)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainBenchResult:
        if data.get("schema") != SCHEMA:
            raise WasiToolError(f"training bench schema {data.get('schema')!r} is not {SCHEMA!r}")
        try:
            ratios = {m: Ratios(**r) for m, r in data.get("ratios_by_method", {}).items()}
            first = next((m for m, r in ratios.items() if asdict(r) == data.get("ratios")), None)
            return cls(
                data["config"],
                data["vs"],
                {m: StepMeasurement(**r) for m, r in data["methods"].items()},
                ratios,
                first,
            )
        except (KeyError, TypeError) as exc:
            raise WasiToolError(f"malformed training bench result: {exc}") from None


def measure(config: TrainBenchConfig) -> StepMeasurement:
    """Run the steps in this process (the worker side): the training session finetune builds
    (``training.session.prepare_session``) and the method's own step, on a synthetic batch of
    the model's input."""
    import torch

    from wasi_tool.allocator import follow_live_memory, in_use, release_free_memory
    from wasi_tool.measure import file_backed_bytes, library_floor
    from wasi_tool.models.loading import ModelSource, load_model
    from wasi_tool.training.session import prepare_session

    # resident memory follows live memory (what the plan predicts) when the run saves memory
    allocator = follow_live_memory() if config.saves_memory else in_use()
    use_threads(config.threads)
    torch.manual_seed(config.seed)
    src = ModelSource(
        checkpoint=Path(config.checkpoint) if config.checkpoint else None,
        arch=config.arch,
        num_classes=config.num_classes,
        img_size=config.img_size,
        random_init=config.random_init,
        seed=config.seed,
    )
    loaded = load_model(src)
    model = loaded.model
    release_free_memory()  # as build_session does before reading the floor
    floor, floor_file = library_floor(model), file_backed_bytes()
    x, y = _synthetic_batch(loaded, config)
    settings = config.method_config()
    # a synthetic batch carries no spectrum: without explicit or per-layer ranks the bench
    # takes the shape rule (training/session.py's RANK_RULES)
    rule = "per-layer" if config.act_ranks_by_layer else None
    given = (config.act_ranks, config.act_eps, config.act_budget_mb)
    if rule is None and all(v is None for v in given):
        rule = "shape"
    session = prepare_session(
        model,
        settings,
        lambda: (x, y),
        rule=rule,
        by_layer=config.act_ranks_by_layer,
        source=config.settings_from,
        loaded=loaded,
        floor=floor,
    )
    targets, ranks, plan = session.targets, session.act_ranks, session.plan
    stats = _timed_steps(session, x, y, config)
    peak = stats["peak_rss_bytes"]
    return StepMeasurement(
        method=config.method,
        arch=loaded.arch,
        input=list(x.shape),
        targets=len(targets),
        act_ranks_first_target=list(ranks[targets[0]]) if ranks else None,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        bsr=session.method.plan_record(session.prepared.plan),
        steps=config.steps,
        warmup=config.warmup,
        threads=torch.get_num_threads(),
        floor_rss_bytes=floor,
        floor_file_bytes=floor_file,
        memory_mode=plan.chosen.label if plan else config.memory_mode,
        memory_plan={**plan.to_dict(), "measured_peak_bytes": peak} if plan else None,
        allocator=allocator,
        act_ranks_rule=session.rank_rule_text() if session.prepared.calibration else None,
        **stats,
    )


def _timed_steps(session: Any, x: Any, y: Any, config: TrainBenchConfig) -> dict[str, Any]:
    """Warm-up and timed steps of the session's method on (x, y): step times, bytes saved
    for backward, the peak RSS, the file-backed pages at the peak, and the live-tensor
    high-water mark of one more step."""

    from wasi_tool.bench.runner import percentile
    from wasi_tool.measure import LiveTensorMeter, SavedBytesMeter, file_backed_bytes
    from wasi_tool.measure import peak_rss_bytes as read_peak
    from wasi_tool.training.loop import train_step

    model, method, opt = session.model, session.method, session.optimizer
    meter = SavedBytesMeter(model, session.targets)
    times, saved, saved_targets = [], [], []
    for step in range(config.warmup + config.steps):
        result = train_step(
            model, opt, x, y, method=method, meter=meter, where=f"bench step {step + 1}"
        )
        if step >= config.warmup:
            times.append(result.seconds)
            saved.append(result.saved_total)
            saved_targets.append(result.saved_targets)
    peak = read_peak()  # before the slower metered step below
    # library code paged in by the steps (file-backed, read when first run; warm-up steps run
    # every kernel once, so this is the file-backed share of the peak within a few pages)
    file_at_peak = file_backed_bytes()
    # the last step's gradients go first: the meter does not count them (made before it), and
    # kept through the next forward they raised the process by their size (4.4 GB at
    # TinyLlama-1.1B's shapes) after the peak was read
    opt.zero_grad(set_to_none=True)
    with LiveTensorMeter() as live:  # one more step: what it allocates over weights and input
        train_step(model, opt, x, y, method=method)
    return {
        "median_step_seconds": statistics.median(times),
        "p90_step_seconds": percentile(times, 90),
        "min_step_seconds": min(times),
        "p10_step_seconds": percentile(times, 10),
        "max_step_seconds": max(times),
        "peak_rss_bytes": peak,
        "saved_bytes_total": statistics.median(saved),
        "saved_bytes_targets": statistics.median(saved_targets),
        "live_tensor_peak_bytes": live.peak,
        "file_bytes_at_peak": file_at_peak,
    }


def _synthetic_batch(loaded: Any, config: TrainBenchConfig) -> tuple[Any, Any]:
    """A random input batch of the model's kind, and labels: random classes, or for a causal
    LM the next tokens (the input shifted by one)."""

    from wasi_tool.models.families import family_of
    from wasi_tool.training.loss import IGNORE

    model = loaded.model
    family = family_of(model)
    spec = family.input_spec(model, loaded.model_kwargs)
    x = family.example_input(model, spec, config.batch_size, config.seq_len)
    classes = int(getattr(model, "num_classes", 1000) or 1000)
    return x, family.task(model).example_labels(x, classes, IGNORE)


def settings_of(artifact: Path) -> dict[str, object] | None:
    """What a fine-tune artifact says it trained with, as TrainBenchConfig fields: its
    targets, calibrated activation ranks per layer, eps, seed and baseline options (None when
    ``artifact`` holds no fine-tune metrics). The memory mode, budget and lossy storage stay
    the bench's own: they are what a bench varies, and its tables state them."""
    path = Path(artifact) / METRICS
    if not path.is_file():
        return None
    try:
        metrics = read_json(path, f"fine-tune metrics {path}")
        cfg = metrics.get("config", {})
        out: dict[str, object] = {
            "targets": ",".join(metrics["targets"]) or None,
            "act_ranks_by_layer": metrics.get("act_ranks") or None,
            "settings_from": str(artifact),
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WasiToolError(f"cannot read the fine-tune settings in {path}: {exc}") from None
    for key in ("eps", "seed", *option_keys()):
        if key in cfg:
            out[key] = cfg[key]
    return out


def settings_text(result: TrainBenchResult) -> str:
    """What a training bench ran with, in one sentence (its tables print it)."""
    cfg = result.config
    source = (
        f"from {cfg['settings_from']}"
        if cfg.get("settings_from")
        else "explicit (--act-ranks)"
        if cfg.get("act_ranks")
        else "by the bench's default rule (B/4, N/4, 32), not a fine-tune's"
    )
    return (
        f"{cfg.get('steps')} timed steps after {cfg.get('warmup')} warm-up, batch "
        f"{cfg.get('batch_size')}, targets {cfg.get('targets') or 'the default preset'}, "
        f"eps {cfg.get('eps')}; activation ranks {source}"
    )


def methods_of(config: TrainBenchConfig) -> list[str]:
    """``config.method`` may name several methods, comma-separated (e.g. "wasi,bsr,lora")."""
    return [m.strip() for m in config.method.split(",") if m.strip()]


def run_train_bench(
    config: TrainBenchConfig,
    vs: str | None = None,
    note: Callable[[str], None] | None = None,
) -> TrainBenchResult:
    """Each method of ``config.method`` (and the ``vs`` baseline), in a fresh Python process.

    ``ratios`` compares the first method with ``vs``; ``ratios_by_method`` every method.
    ``note`` hears a line as each method starts and ends (the CLI prints them).
    """
    methods = [*methods_of(config), *([vs] if vs else [])]
    if not methods:
        raise WasiToolError("no method to benchmark")
    for m in methods:
        config.method_config(m)  # bad settings fail here, before any process starts
    env, _ = worker_env(config.allocator)
    results: dict[str, StepMeasurement] = {}
    todo = list(dict.fromkeys(methods))
    for i, m in enumerate(todo, 1):
        if note:
            note(
                f"training bench {i}/{len(todo)}: {m}, {config.warmup} warm-up + "
                f"{config.steps} timed steps in a fresh process..."
            )
        started = time.perf_counter()
        payload = json.dumps({**config.to_dict(), "method": m})
        proc = subprocess.run(
            [sys.executable, "-m", "wasi_tool.bench.train_worker", payload],
            capture_output=True,
            text=True,
            check=False,
            timeout=3600,
            env={**os.environ, **env},
        )
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            line = err[-1] if err else "no output"
            line = line.removeprefix("error: ")  # the worker's own one-line error, said once
            raise WasiToolError(f"training bench of {m} failed: {line}")
        results[m] = StepMeasurement(**json.loads(lines[-1]))
        if note:
            r = results[m]
            note(
                f"training bench {i}/{len(todo)}: {m}: median step "
                f"{r.median_step_seconds * 1e3:.1f} ms, peak RSS {r.peak_rss_bytes / 1e6:.0f} MB "
                f"({time.perf_counter() - started:.0f} s)"
            )
    out = TrainBenchResult(config.to_dict(), vs, results)
    if vs:
        b = results[vs]
        out.ratios_by_method = {
            m: Ratios(
                step_speedup_vs=b.median_step_seconds / a.median_step_seconds,
                peak_rss_ratio_vs=b.peak_rss_bytes / a.peak_rss_bytes,
                saved_bytes_ratio_vs=b.saved_bytes_total / max(1, a.saved_bytes_total),
                target_saved_bytes_ratio_vs=b.saved_bytes_targets / max(1, a.saved_bytes_targets),
            )
            for m, a in results.items()
            if m != vs
        }
        if methods[0] != vs:
            out.first = methods[0]
    return out
