"""Training-step benchmark: each method in a fresh subprocess, synthetic input of the model's shape.

The worker (``python -m wasi_tool.bench.train``) loads the model, prepares the method, runs
warm-up then timed steps (forward, backward, update), and prints one JSON object: the median
step time, the peak RSS of its process, and the bytes autograd saved for backward per step.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wasi_tool.errors import WasiToolError
from wasi_tool.methods.options import BaselineOptions

SCHEMA = "wasi-tool-bench-train/1"


@dataclass
class TrainBenchConfig(BaselineOptions):
    """One training-step measurement (the model source fields mirror ModelSource)."""

    checkpoint: str | None = None
    arch: str | None = None
    num_classes: int | None = None
    img_size: int | None = None
    random_init: bool = False
    method: str = "wasi"
    targets: str | None = None
    eps: float = 0.8
    act_ranks: list[int] | None = None
    batch_size: int = 32
    seq_len: int = 128  # tokens per input of a text model
    steps: int = 20
    warmup: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.steps < 1 or self.warmup < 0:
            raise WasiToolError("batch size and steps must be >= 1, warm-up >= 0")

    def method_config(self, method: str | None = None) -> Any:
        """The finetune settings of ``method`` (default: this config's) for these fields."""
        from wasi_tool.stages.finetune import FinetuneConfig

        return FinetuneConfig(
            method=method or self.method,
            targets=self.targets,
            eps=self.eps,
            act_ranks=self.act_ranks,
            seed=self.seed,
            **self.baseline_options(),
        )


def _default_act_ranks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(B/4, N/4, min(32, C)) for (B, N, C); (B/4, H/2, W/2, min(32, C)) for (B, H, W, C)."""
    if len(shape) == 3:
        return (max(1, shape[0] // 4), max(1, shape[1] // 4), min(32, shape[2]))
    return (max(1, shape[0] // 4), max(1, shape[1] // 2), max(1, shape[2] // 2), min(32, shape[3]))


def measure(config: TrainBenchConfig) -> dict[str, Any]:
    """Run the steps in this process (the worker side)."""
    import torch
    import torch.nn.functional as F

    from wasi_tool.bench.runner import percentile
    from wasi_tool.measure import SavedBytesMeter, peak_rss_bytes
    from wasi_tool.methods import SubspaceSGD
    from wasi_tool.methods.calibrate import capture
    from wasi_tool.models import hf
    from wasi_tool.models.loading import ModelSource, load_model
    from wasi_tool.stages.finetune import model_input_size, prepare_for_training

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
    classes = int(getattr(model, "num_classes", 1000) or 1000)
    if hf.is_hf(model):  # a text model: random token ids
        x = hf.random_token_ids(model, config.batch_size, config.seq_len)
    else:
        size = model_input_size(loaded)
        x = torch.randn(config.batch_size, 3, size, size)
    y = torch.randint(0, classes, (config.batch_size,))

    def default_ranks(targets: list[str]) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
        if config.act_ranks:
            return {n: tuple(config.act_ranks) for n in targets}, {"rule": "explicit"}
        shapes = {n: tuple(a.shape) for n, (a, _) in capture(model, targets, x).items()}
        return {n: _default_act_ranks(shapes[n]) for n in targets}, {"rule": "B/4, N/4, 32"}

    prepared = prepare_for_training(model, config.method_config(), default_ranks)
    targets, ranks = prepared.targets, prepared.act_ranks
    model.train()
    opt = SubspaceSGD(model, lr=0.01, weight_decay=1e-4, clip=2.0)
    meter = SavedBytesMeter(model, targets)
    times, saved, saved_targets = [], [], []
    for step in range(config.warmup + config.steps):
        start = time.perf_counter()
        with meter:
            logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        elapsed = time.perf_counter() - start
        if step >= config.warmup:
            times.append(elapsed)
            saved.append(meter.total)
            saved_targets.append(meter.targets)
    return {
        "schema": SCHEMA,
        "method": config.method,
        "arch": loaded.arch,
        "input": list(x.shape),
        "targets": len(targets),
        "act_ranks_first_target": list(ranks[targets[0]]) if ranks else None,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "bsr": prepared.bsr_plan.to_dict() if prepared.bsr_plan else None,
        "steps": config.steps,
        "warmup": config.warmup,
        "median_step_seconds": statistics.median(times),
        "p90_step_seconds": percentile(times, 90),
        "peak_rss_bytes": peak_rss_bytes(),
        "saved_bytes_total": statistics.median(saved),
        "saved_bytes_targets": statistics.median(saved_targets),
        "threads": torch.get_num_threads(),
    }


def methods_of(config: TrainBenchConfig) -> list[str]:
    """``config.method`` may name several methods, comma-separated (e.g. "wasi,bsr,lora")."""
    return [m.strip() for m in config.method.split(",") if m.strip()]


def run_train_bench(config: TrainBenchConfig, vs: str | None = None) -> dict[str, Any]:
    """Each method of ``config.method`` (and the ``vs`` baseline), in a fresh Python process.

    ``ratios`` compares the first method with ``vs``; ``ratios_by_method`` every method.
    """
    methods = [*methods_of(config), *([vs] if vs else [])]
    if not methods:
        raise WasiToolError("no method to benchmark")
    for m in methods:
        config.method_config(m)  # bad settings fail here, before any process starts
    results = {}
    for m in dict.fromkeys(methods):
        payload = json.dumps({**asdict(config), "method": m})
        proc = subprocess.run(
            [sys.executable, "-m", "wasi_tool.bench.train", payload],
            capture_output=True,
            text=True,
            check=False,
            timeout=3600,
        )
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            raise WasiToolError(f"training bench of {m} failed: {err[-1] if err else 'no output'}")
        results[m] = json.loads(lines[-1])
    out: dict[str, Any] = {
        "schema": SCHEMA,
        "config": asdict(config),
        "vs": vs,
        "methods": results,
    }
    if vs:
        b = results[vs]
        out["ratios_by_method"] = {
            m: {
                "step_speedup_vs": b["median_step_seconds"] / a["median_step_seconds"],
                "peak_rss_ratio_vs": b["peak_rss_bytes"] / a["peak_rss_bytes"],
                "saved_bytes_ratio_vs": b["saved_bytes_total"] / max(1, a["saved_bytes_total"]),
                "target_saved_bytes_ratio_vs": b["saved_bytes_targets"]
                / max(1, a["saved_bytes_targets"]),
            }
            for m, a in results.items()
            if m != vs
        }
        first = methods[0]
        if first != vs:
            out["ratios"] = out["ratios_by_method"][first]
    return out


def _worker() -> None:
    data = json.loads(sys.argv[1])
    try:
        result = measure(TrainBenchConfig(**data))
    except WasiToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(result))


if __name__ == "__main__":
    _worker()
