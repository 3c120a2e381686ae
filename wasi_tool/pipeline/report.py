"""The report stage: compare the stages of a run in report.md, report.json and PNG plots."""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from wasi_tool import artifact
from wasi_tool.artifact import BENCH as BENCH_FILE
from wasi_tool.artifact import COMPRESS, EXPORT, FEDERATE, FINETUNE, ONNX
from wasi_tool.artifact import METRICS as METRICS_FILE
from wasi_tool.artifact import REPORT_MD as REPORT_MD
from wasi_tool.bench.train import TrainBenchResult, settings_text
from wasi_tool.measure import pace
from wasi_tool.safe_read import read_json
from wasi_tool.training.results import ActRankRecord, FinetuneMetrics

if TYPE_CHECKING:
    from wasi_tool.training.plan import MemoryPlanRecord
from wasi_tool.wording import ratio as words
from wasi_tool.wording import spread, wide

__all__ = ["BENCH_FILE", "REPORT_MD", "RunSummary", "stage_kind", "write_report"]


class FinetuneSummary(TypedDict):
    method: str
    test_accuracy: float
    total: float | None  # SavedBytes: bytes saved for backward per step, all and in targets
    targets: float | None
    note: str


class ExportSummary(TypedDict):
    onnx_bytes: int


class CompressSummary(TypedDict):
    layers: int
    median_heldout_plain: float
    median_calibrated_over_plain: float | None


class FederateSummary(TypedDict):
    method: str | None
    clients: int | None
    partition: str | None
    rounds: int
    test_loss: float | None
    test_accuracy: float | None


class MemoryRow(TypedDict):
    stage: str
    method: str
    memory_mode: str
    memory_plan: MemoryPlanRecord | None
    peak_rss_bytes: float
    above_floor_bytes: float | None
    test_accuracy: float | None
    allocator: str | None


class RunSummary(TypedDict, total=False):
    """The run's ``report.json``: each reported stage's figures, by kind then stage name."""

    finetune: dict[str, FinetuneSummary]
    train_bench: dict[str, dict[str, float]]  # bench.train.Ratios
    inference: dict[str, dict[str, Any]]
    export: dict[str, ExportSummary]
    memory: list[MemoryRow]
    compress: dict[str, CompressSummary]
    federate: dict[str, FederateSummary]


def stage_kind(directory: Path) -> str | None:
    """The kind of what a stage of the run wrote, as it recorded it: an artifact's last stage
    record (compress, finetune, export, federate, ...), a bench's ``kind`` (``train`` or
    ``inference`` bench); None for anything else."""
    if artifact.is_artifact_dir(directory):
        return artifact.load_manifest(directory).kind
    if (directory / BENCH_FILE).is_file():
        kind = read_json(directory / BENCH_FILE).get("kind")
        return "train-bench" if kind == "train" else "inference-bench"
    return None


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _mb(n: float | None) -> str:
    return "" if n is None else f"{n / 1e6:.2f} MB"


def _ranks_text(ranks: dict[str, list[int]] | None, rule: str | None) -> str:
    """Activation ranks in a cell: "16x5x24 (1 of 12 layers; eps 0.9)" or "none"."""
    if not ranks:
        return "none (no activation compression)"
    shapes = list(dict.fromkeys("x".join(map(str, r)) for r in ranks.values()))
    first = shapes[0] if len(shapes) == 1 else f"{shapes[0]} .. {shapes[-1]}"
    return f"{first} ({len(ranks)} layers; {rule or 'given'})"


def _rule_of(calibration: ActRankRecord | None) -> str | None:
    if not calibration:
        return None
    rule = str(calibration.get("rule"))
    if rule == "eps":
        return f"calibrated at act_eps {calibration.get('act_eps')}"
    if rule == "budget":
        return f"calibrated to {calibration.get('budget_mib')} MiB"
    return rule


def _step_cell(median: float, low: float | None, high: float | None) -> str:
    """The median step with its spread, flagged when wide."""
    if low is None or high is None:
        return f"{median * 1e3:.1f} ms"
    flag = " (wide: machine busy?)" if wide(median, low, high) else ""
    return f"{spread(median, low, high)}{flag}"


def write_report(run_dir: Path, names: list[str], out: Path, title: str) -> RunSummary:
    """Compare the named stages' outputs: report.md, report.json and PNG plots in ``out``.
    Each stage is reported by the kind it recorded (``stage_kind``)."""
    finetunes: list[tuple[str, FinetuneMetrics]] = []
    compresses: list[tuple[str, dict[str, Any], Path]] = []
    trains: list[tuple[str, TrainBenchResult]] = []
    inferences: list[tuple[str, dict[str, Any]]] = []
    exports: list[tuple[str, Path]] = []
    federates: list[tuple[str, artifact.Manifest]] = []
    for name in names:
        d = run_dir / name
        kind = stage_kind(d)
        if kind == FINETUNE and (d / METRICS_FILE).is_file():
            metrics = read_json(d / METRICS_FILE)
            finetunes.append((name, FinetuneMetrics.from_dict(metrics)))
        elif kind == "train-bench":
            trains.append((name, TrainBenchResult.from_dict(read_json(d / BENCH_FILE))))
        elif kind == "inference-bench":
            inferences.append((name, read_json(d / BENCH_FILE)))
        elif kind == EXPORT and (d / ONNX).is_file():
            exports.append((name, d))
        elif kind == COMPRESS and (d / artifact.REPORT).is_file():
            compresses.append((name, read_json(d / artifact.REPORT), d))
        elif kind == FEDERATE:
            federates.append((name, artifact.load_manifest(d)))
    lines = [f"# {title}", ""]
    summary: RunSummary = {"finetune": {}, "train_bench": {}, "inference": {}, "export": {}}
    if trains:
        lines += _memory_lead(trains, finetunes, summary)
    for name, rep, _ in compresses:
        lines += _compress_section(name, rep, summary)
    for name, manifest in federates:
        lines += _federate_section(name, manifest, summary)
    base = next((m for _, m in finetunes if m.method == "vanilla"), None)
    if finetunes:
        lines += [
            "## Fine-tuning (measured in the run)",
            "",
            "Each stage's own settings: its memory mode and activation ranks (per layer, "
            "B x N x C of the saved input; the first and last when they differ).",
            "",
            _row(
                "stage",
                "method",
                "memory mode",
                "act ranks",
                "test acc",
                "median step",
                "saved / step",
                "in targets",
                "vs vanilla (targets)",
                "stage peak RSS (the run's process)",
            ),
            _row(*["---"] * 10),
        ]
        for name, m in finetunes:
            saved = m.measured.saved_bytes_per_step
            ratio = ""
            base_targets = base.measured.saved_bytes_per_step.targets if base else None
            if base_targets and saved.targets:
                ratio = words(base_targets / saved.targets)
            acc = m.final.test_accuracy if m.final else float("nan")
            meas = m.measured
            step = _step_cell(
                meas.median_step_seconds, meas.p10_step_seconds, meas.p90_step_seconds
            )
            lines.append(
                _row(
                    name,
                    m.method,
                    m.config.get("memory_mode", "off"),
                    _ranks_text(m.act_ranks, _rule_of(m.act_calibration)),
                    f"{acc:.4f}",
                    step,
                    _mb(saved.total),
                    _mb(saved.targets),
                    ratio,
                    _mb(m.measured.peak_rss_bytes),
                )
            )
            summary["finetune"][name] = {
                "method": m.method,
                "test_accuracy": acc,
                "total": saved.total,
                "targets": saved.targets,
                "note": saved.note,
            }
        lines.append("")
    for name, b in trains:
        first = next(iter(b.methods.values()), None)
        lines += [
            f"## Training step, a fresh process per method ({name})",
            "",
            f"Synthetic input {'x'.join(map(str, first.input)) if first else '?'}; "
            f"{settings_text(b)}" + ". Median step with its p10-p90 spread.",
            "",
            _row(
                "method",
                "memory mode",
                "act ranks (first target)",
                "median step",
                "peak RSS",
                "library floor",
                "above floor",
                "saved / step",
                "in targets",
            ),
            _row(*["---"] * 9),
        ]
        for method, r in b.methods.items():
            floor = r.floor_rss_bytes
            act = r.act_ranks_first_target
            lines.append(
                _row(
                    method,
                    r.memory_mode,
                    f"{'x'.join(map(str, act))} ({r.act_ranks_rule})" if act else "none",
                    _step_cell(r.median_step_seconds, r.p10_step_seconds, r.p90_step_seconds),
                    _mb(r.peak_rss_bytes),
                    _mb(floor),
                    _mb(None if floor is None else r.peak_rss_bytes - floor),
                    _mb(r.saved_bytes_total),
                    _mb(r.saved_bytes_targets),
                )
            )
        ratios = b.ratios
        if ratios is not None:
            lines.append(
                _row(
                    f"{b.first} vs {b.vs}",
                    "",
                    "",
                    pace(ratios.step_speedup_vs),
                    words(ratios.peak_rss_ratio_vs, "memory"),
                    "",
                    "",
                    words(ratios.saved_bytes_ratio_vs),
                    words(ratios.target_saved_bytes_ratio_vs),
                )
            )
        summary["train_bench"][name] = dataclasses.asdict(ratios) if ratios else {}
        lines.append("")
    for name, bench in inferences:
        lines += [
            f"## Inference, onnxruntime ({name}: {bench['ran_on']['note']}, batch "
            f"{bench['batch']}, {bench['threads']} threads)",
            "",
            _row("model", "file", "p50 (p10-p90)"),
            _row(*["---"] * 3),
        ]
        for key, stage in zip(("a", "b"), bench.get("stages", []), strict=False):
            m = bench["models"][key]
            p50 = (
                _step_cell(m["p50_ms"] / 1e3, m["p10_ms"] / 1e3, m["p90_ms"] / 1e3)
                if "p10_ms" in m
                else f"{m['p50_ms']:.2f} ms"
            )
            lines.append(_row(stage, _mb(m["file_bytes"]), p50))
        if "ratios" in bench:
            r = bench["ratios"]
            size = words(r["file_size_ratio_vs"], "size")
            lines.append(_row("ratio", size, pace(r["p50_speedup_vs"])))
        summary["inference"][name] = bench.get("ratios", {})
        lines.append("")
    for name, d in exports:
        summary["export"][name] = {"onnx_bytes": (d / ONNX).stat().st_size}
    plots = _plots(finetunes, compresses, out, trains)
    if plots:
        lines += ["## Plots", "", *[f"![{p}]({p})" for p in plots], ""]
    (out / REPORT_MD).write_text("\n".join(lines))
    artifact.write_json(out / artifact.REPORT, summary)
    return summary


def _federate_section(name: str, manifest: artifact.Manifest, summary: RunSummary) -> list[str]:
    """A federate stage: its setting (clients, partition, method) and the global model's
    held-out figures after each round."""
    fed = manifest.federated
    history = fed.get("history", []) if fed is not None else []
    config = manifest.stages[-1].config or {}  # the stage's settings, when no summary says
    method = fed.get("method") if fed is not None else config.get("method")
    clients = fed.get("clients") if fed is not None else config.get("clients")
    partition = fed.get("partition") if fed is not None else config.get("partition")
    lines = [
        f"## Federated training ({name}: {method}, {clients} clients, partition {partition}, "
        f"{len(history)} rounds)",
        "",
        _row("round", "updates accepted", "test loss", "test acc", "seconds"),
        _row(*["---"] * 5),
    ]
    for r in history:
        loss, acc = r.get("test_loss"), r.get("test_accuracy")
        lines.append(
            _row(
                r.get("round"),
                f"{r.get('accepted')} / {len(r.get('clients') or [])}",
                "" if loss is None else f"{loss:.4f}",
                "" if acc is None else f"{acc:.4f}",
                r.get("seconds", ""),
            )
        )
    lines.append("")
    summary.setdefault("federate", {})[name] = {
        "method": method,
        "clients": clients,
        "partition": partition,
        "rounds": len(history),
        "test_loss": history[-1].get("test_loss") if history else None,
        "test_accuracy": history[-1].get("test_accuracy") if history else None,
    }
    return lines


def _compress_section(name: str, rep: dict[str, Any], summary: RunSummary) -> list[str]:
    """A compress stage's layers: rank, and the relative output error on held-out inputs of
    plain SVD and of the calibrated truncation at that rank (when it was calibrated)."""
    layers = [x for x in rep.get("layers", []) if x.get("status") == "factored"]
    if not layers:
        return []
    held = [x for x in layers if x.get("heldout_plain") is not None]
    cfg = rep.get("config", {})
    how = f"calibrated on {cfg['calibrate']}" if cfg.get("calibrate") else "plain SVD"
    lines = [f"## Compression ({name}: {how}, eps {cfg.get('eps')})", ""]
    if not held:
        ranks = ", ".join(str(x["rank"]) for x in layers)
        return [*lines, f"{len(layers)} layers factored; ranks {ranks}.", ""]
    lines += [
        "Relative output error ||X (W - L R)^T|| / ||X W^T|| on held-out inputs, at each "
        "layer's rank: plain SVD, and the truncation in the metric of the inputs.",
        "",
        _row("layer", "rank", "plain SVD", "calibrated", "calibrated / plain"),
        _row(*["---"] * 5),
    ]
    ratios = []
    for x in held:
        plain, cal = x["heldout_plain"], x.get("heldout_calibrated")
        ratio = cal / plain if cal is not None and plain else None
        if ratio is not None:
            ratios.append(ratio)
        lines.append(
            _row(
                x["name"],
                f"{x['rank']} / {x['full_rank']}",
                f"{plain:.4f}",
                "" if cal is None else f"{cal:.4f}",
                "" if ratio is None else f"{ratio:.2f}",
            )
        )
    lines.append("")
    summary.setdefault("compress", {})[name] = {
        "layers": len(held),
        "median_heldout_plain": statistics.median(x["heldout_plain"] for x in held),
        "median_calibrated_over_plain": statistics.median(ratios) if ratios else None,
    }
    return lines


def _memory_lead(
    trains: list[tuple[str, TrainBenchResult]],
    finetunes: list[tuple[str, FinetuneMetrics]],
    summary: RunSummary,
) -> list[str]:
    """What a device user asks first: each method's whole-process peak memory (its own fresh
    process, from the training benches), the memory mode or budget plan, accuracy beside it."""
    rows = [(stage, method, r) for stage, b in trains for method, r in b.methods.items()]
    base = next(
        (r for _, m, r in rows if m == "vanilla" and r.memory_mode == "off" and not r.memory_plan),
        None,
    )
    base_above = base.peak_rss_bytes - base.floor_rss_bytes if base and base.floor_rss_bytes else 0
    # accuracy: the last fine-tune stage of each method (a pretraining stage comes first)
    accuracy = {m.method: (name, m.final.test_accuracy) for name, m in finetunes if m.final}
    lines = [
        "## Whole-process memory per method (a fresh process each)",
        "",
        "Peak RSS is each training process's own high-water mark (VmHWM); the library floor is "
        "its resident size with the model loaded, less the weights; above the floor is what "
        "training adds. The exact memory modes recompute in backward and change no gradient, "
        "so their accuracy is the method's. Figures at this toy size are dominated by the "
        "floor; benchmarks/e2e_step.py measures ViT-B/32 at 224 px.",
        "",
        _row(
            "method",
            "memory (mode or plan)",
            "act ranks (first target)",
            "test acc (fine-tune stage)",
            "peak RSS",
            "above floor",
            "vs vanilla",
            "saved / step",
            "median step",
            "allocator",
        ),
        _row(*["---"] * 10),
    ]
    summary["memory"] = []
    for stage, method, r in rows:
        above = r.peak_rss_bytes - r.floor_rss_bytes if r.floor_rss_bytes else None
        mode = r.memory_mode
        if r.memory_plan:
            plan = r.memory_plan
            mode = (
                f"budget {_mb(plan['budget_bytes'])}: {plan['memory_mode']}, predicted "
                f"{_mb(plan['predicted_peak_bytes'])}"
            )
        acc = accuracy.get(method)
        ratio = ""
        if base is not None and above and base_above and r is not base:
            ratio = words(base_above / above, "memory")
        act = r.act_ranks_first_target
        lines.append(
            _row(
                method,
                mode,
                f"{'x'.join(map(str, act))} ({r.act_ranks_rule})" if act else "none",
                f"{acc[1]:.4f} ({acc[0]})" if acc else "",
                _mb(r.peak_rss_bytes),
                _mb(above),
                ratio,
                _mb(r.saved_bytes_total),
                _step_cell(r.median_step_seconds, r.p10_step_seconds, r.p90_step_seconds),
                r.allocator or "",
            )
        )
        summary["memory"].append(
            {
                "stage": stage,
                "method": method,
                "memory_mode": r.memory_mode,
                "memory_plan": r.memory_plan,
                "peak_rss_bytes": r.peak_rss_bytes,
                "above_floor_bytes": above,
                "test_accuracy": acc[1] if acc else None,
                "allocator": r.allocator,
            }
        )
    return [*lines, "", *_allocator_line([r.allocator for _, _, r in rows])]


def _allocator_line(names: list[str | None]) -> list[str]:
    """One line under the memory table: the allocator each row's process ran on (peaks on glibc
    stay higher: it keeps freed memory resident; wasi_tool/allocator.py)."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name or "unknown"] = counts.get(name or "unknown", 0) + 1
    if not counts:
        return []
    if len(counts) == 1:
        text = f"Allocator: every row ran on {next(iter(counts))}."
    else:
        each = (f"{n} ({c} row{'s' if c > 1 else ''})" for n, c in counts.items())
        text = "Allocators: " + ", ".join(each) + "."
    if any(n.startswith(("glibc", "system")) for n in counts):
        text += (
            " glibc keeps freed memory resident, so its peaks sit higher than on tcmalloc or "
            "jemalloc (apt-get install libtcmalloc-minimal4; scripts/demo.sh preloads it when "
            "installed)."
        )
    return [text, ""]


def _plots(
    finetunes: list[tuple[str, FinetuneMetrics]],
    compresses: list[tuple[str, dict[str, Any], Path]],
    out: Path,
    trains: list[tuple[str, TrainBenchResult]] | None = None,
) -> list[str]:
    from wasi_tool.plots import plot_memory_accuracy, plot_ranks, plot_training

    made = []
    for name, _, d in compresses:
        if os.path.lexists(d / artifact.ENERGY_PLOT):
            energy = artifact.safe_member(d, artifact.ENERGY_PLOT)  # never a link out of it
            shutil.copyfile(energy, out / f"energy-{name}.png")
            made.append(f"energy-{name}.png")
    for name, rep, _ in compresses:
        cfg = rep.get("config", {})
        eps = cfg.get("eps") if cfg.get("rank_ratio") is None else None
        plot_ranks(rep["layers"], eps, f"rank per layer ({name})", out / f"ranks-{name}.png")
        made.append(f"ranks-{name}.png")
    if finetunes:
        plot_training(finetunes, out / "training.png")
        # the whole process's peak per method: the training bench's fresh processes (off mode)
        peaks: dict[str, tuple[float, float | None, str]] = {}
        for bench_name, b in trains or []:
            for method, r in b.methods.items():
                if method not in peaks and r.memory_mode == "off":
                    where = f"bench {bench_name}: a fresh process per method"
                    peaks[method] = (r.peak_rss_bytes, r.floor_rss_bytes, where)
        # one task: the one most fine-tunes trained (a pretraining stage is another task)
        task = lambda m: (m.data, tuple(m.classes))  # noqa: E731
        tasks = [task(m) for _, m in finetunes]
        main = max(set(tasks), key=tasks.count)
        shown = [(n, m) for n, m in finetunes if task(m) == main]
        plot_memory_accuracy(
            shown,
            {k: v for k, v in peaks.items() if k in {m.method for _, m in shown}},
            out / "memory-accuracy.png",
        )
        made += ["training.png", "memory-accuracy.png"]
    return made
