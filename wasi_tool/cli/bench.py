"""`wasi-tool bench`: onnxruntime latency (device profiles, local or SSH) or training steps."""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from wasi_tool.bench.profiles import PROFILES
from wasi_tool.cli import common
from wasi_tool.cli.common import console, default, human_bytes

# their defaults, without torch (the classes are imported where the configs are built)
from wasi_tool.cli.defaults import InferenceBenchConfig, TrainBenchConfig
from wasi_tool.cli.settings import flat_settings, takes_settings
from wasi_tool.errors import WasiToolError
from wasi_tool.threads import check_threads
from wasi_tool.wording import ratio as words
from wasi_tool.wording import spread, wide

if TYPE_CHECKING:  # the library (torch) loads when the command runs, not to parse its flags
    from wasi_tool.bench import SSHTarget
    from wasi_tool.bench.profiles import DeviceProfile
    from wasi_tool.bench.train import TrainBenchResult

_I = InferenceBenchConfig  # the defaults, read from the configs, never copied by hand
_T = TrainBenchConfig
# settings of a training bench that a recipe or a stored config gives, not the command line:
# the model source is MODEL (--arch...), where per-layer ranks came from is --train ARTIFACT's
TRAIN_ONLY_IN_FILES = {"checkpoint", "settings_from", "seq_len"}


@takes_settings("TrainBenchConfig", skip=TRAIN_ONLY_IN_FILES, prefix="--train: ")
def bench(
    model: Annotated[
        Path | None,
        typer.Argument(
            help="ONNX model to time (inference bench), or with --train the checkpoint or "
            "artifact to train (none with --random-init).",
            show_default=False,
        ),
    ] = None,
    vs: Annotated[
        str | None,
        typer.Option(help="Compare with: another ONNX file, or with --train a method name."),
    ] = None,
    device: Annotated[str, typer.Option(help=f"Device profile: {', '.join(PROFILES)}.")] = "host",
    ssh: Annotated[
        str | None,
        typer.Option(
            help="Run on a device: user@host[:port] (python3 + onnxruntime; --train: wasi-tool)."
        ),
    ] = None,
    ssh_key: Annotated[Path | None, typer.Option(help="Identity file for --ssh.")] = None,
    remote_python: Annotated[
        str, typer.Option(help="Interpreter on the device that has onnxruntime.")
    ] = "python3",
    known_hosts: Annotated[
        Path | None, typer.Option(help="known_hosts file for --ssh (host keys are checked).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help=f"Batch (default {_I.batch_size} for inference, {_T.batch_size} for --train)."
        ),
    ] = None,
    warmup: Annotated[
        int | None, typer.Option(help=f"Warm-up runs/steps ({_I.warmup} / {_T.warmup}).")
    ] = None,
    repeats: Annotated[int, typer.Option(help="Timed inference runs per model.")] = default(
        InferenceBenchConfig, "repeats"
    ),
    seq_len: Annotated[
        int | None,
        typer.Option(
            help=f"Tokens per input of a text model: the inference bench's ({_I.seq_len}) and, "
            "with --train, the training bench's (default: the model's own example length).",
            show_default=False,
        ),
    ] = None,
    train: Annotated[
        bool,
        typer.Option(
            "--train", help="Time training steps of MODEL (a checkpoint or artifact) instead."
        ),
    ] = False,
    method: Annotated[
        str, typer.Option(help="Method(s) for --train, comma-separated: wasi,bsr,lora.")
    ] = default(TrainBenchConfig, "method"),
    act_ranks: Annotated[
        str | None, typer.Option(help="Activation ranks for --train (default B/4, N/4, 32).")
    ] = None,
    arch: common.Arch = None,
    num_classes: common.NumClasses = None,
    img_size: common.ImgSize = None,
    random_init: common.RandomInit = False,
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads: of each --train worker (default: one per core), or of the "
            "onnxruntime session (default: the --device profile's).",
            show_default=False,
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write every figure here.")
    ] = None,
    **settings: object,
) -> None:
    """Time an ONNX model on a device profile (locally or over SSH), or training steps (every
    TrainBenchConfig setting is an option of --train, each method's options too)."""
    from wasi_tool import artifact as artifacts
    from wasi_tool.bench import InferenceBenchConfig, SSHTarget, get_profile, run_inference_bench

    result: dict[str, Any] | TrainBenchResult
    with common.user_errors():
        if batch_size is not None and batch_size < 1:  # 0 must not fall back to the default
            raise WasiToolError(f"--batch-size must be >= 1, got {batch_size}")
        target = SSHTarget.parse(ssh, ssh_key, known_hosts, python=remote_python) if ssh else None
        if train or random_init:
            given = flat_settings("TrainBenchConfig", settings)
            if seq_len is not None:  # spelled out on the command line: the training bench's too
                given = {**given, "seq_len": seq_len}
            result = _train(
                model, vs, method, batch_size, warmup, act_ranks, arch, num_classes, img_size,
                random_init, threads, given, target,
            )  # fmt: skip
        else:
            if model is None:
                raise WasiToolError("give an ONNX model, or CHECKPOINT --train")
            profile = get_profile(device)
            if threads is not None:
                check_threads(threads)
                profile = dataclasses.replace(profile, threads=threads)
            config = InferenceBenchConfig(
                batch_size=batch_size or _I.batch_size,
                warmup=_I.warmup if warmup is None else warmup,
                repeats=repeats,
                seq_len=_I.seq_len if seq_len is None else seq_len,
            )
            with common.status("benchmarking..."):
                result = run_inference_bench(
                    model, Path(vs) if vs else None, profile, config, target
                )
            _record_device(result, profile, target)
            render_inference(result)
        if json_path is not None:
            payload = result if isinstance(result, dict) else result.to_dict()
            if not isinstance(result, dict) and (target or platform.machine() == "aarch64"):
                from wasi_tool.doctor import device_record

                payload["device"] = device_record(target)  # where the training bench ran
            artifacts.write_file(json_path, artifacts.dumps_json(payload))


def _train(
    train: Path | None, vs: str | None, method: str, batch_size: int | None,
    warmup: int | None, act_ranks: str | None, arch: str | None, num_classes: int | None,
    img_size: int | None, random_init: bool, threads: int | None,
    given: dict[str, object], target: SSHTarget | None = None,
) -> TrainBenchResult:  # fmt: skip
    from wasi_tool.bench.train import (
        TrainBenchConfig,
        TrainBenchResult,
        run_train_bench,
        settings_of,
    )

    try:
        ranks = [int(v) for v in act_ranks.split(",")] if act_ranks else None
    except ValueError:
        raise WasiToolError(
            f"--act-ranks takes comma-separated integers, got {act_ranks!r}"
        ) from None
    # a fine-tune artifact says what it trained with: its targets and calibrated ranks
    targets = given.get("targets")
    found = settings_of(train) if train is not None and not ranks and not targets else None
    config = TrainBenchConfig.from_flat(
        given,
        checkpoint=str(train) if train else None,
        arch=arch,
        num_classes=num_classes,
        img_size=img_size,
        random_init=random_init,
        method=method,
        act_ranks=ranks,
        batch_size=batch_size or _T.batch_size,
        warmup=_T.warmup if warmup is None else warmup,
        threads=threads,
    )
    if found:
        config = TrainBenchConfig.from_dict({**config.to_dict(), **found})
    if target is not None:  # the same settings, run by the device's wasi-tool
        from wasi_tool.bench.ssh import run_remote_train_bench

        with common.status(f"timing training steps on {target.destination}..."):
            result = TrainBenchResult.from_dict(
                run_remote_train_bench(target, config.to_dict(), vs)
            )
        render_train(result)
        console.print(f"ran on: {target.destination} over SSH", markup=False, highlight=False)
        return result
    with common.status("timing training steps (a fresh process per method)..."):
        result = run_train_bench(config, vs, note=_note)
    render_train(result)
    return result


def _record_device(
    result: dict[str, Any], profile: DeviceProfile, target: SSHTarget | None
) -> None:
    """On an ARM host or over --ssh the record says what the device is (doctor's view), and a
    local --device pi4|pi5 says whether this host is one."""
    if target is None and platform.machine() != "aarch64":
        return  # an x86 host: inference.py's note already says it is not the device
    from wasi_tool.doctor import device_record

    record = device_record(target)
    record["is_profile_device"] = profile.is_this(record["cpu"]["part"])
    result["device"] = record
    if target is None and profile.name != "host":
        cpu = record["cpu"]["model"]
        result["ran_on"]["note"] = (
            f"this host, a {profile.name} by its CPU ({cpu})"
            if record["is_profile_device"]
            else f"this host ({cpu}) with the {profile.name} profile's settings, not a "
            f"{profile.name}"
        )


def _note(message: str) -> None:
    console.print(message, markup=False, highlight=False)


def render_inference(result: dict[str, Any]) -> None:
    from wasi_tool.measure import pace

    prof = result["profile"]
    title = (
        f"onnxruntime {result['onnxruntime']}: batch {result['batch']}, {result['threads']} "
        f"threads, {prof['name']} profile"
    )
    table = Table(title=title)
    cols = (
        "model", "file", "p10 ms", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "mean ms", "img/s",
        "+RSS (alone)",
    )  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in result["models"].values():
        table.add_row(
            Path(m["path"]).name if len(result["models"]) == 1 else m["path"],
            human_bytes(m["file_bytes"]),
            *(
                f"{m[k]:.2f}" if k in m else ""
                for k in ("p10_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms")
            ),
            f"{m['images_per_second']:.1f}",
            human_bytes(m["rss_growth_bytes"]),
        )
    if "ratios" in result:
        r = result["ratios"]
        table.add_section()
        size = words(r["file_size_ratio_vs"], "size")
        table.add_row("model vs --vs", size, "", pace(r["p50_speedup_vs"]), *[""] * 6)
    console.print(table)
    for m in result["models"].values():
        if "p10_ms" in m and wide(m["p50_ms"], m["p10_ms"], m["p90_ms"]):
            console.print(
                f"warning: {Path(m['path']).name}: p10-p90 spans {m['p10_ms']:.2f}-"
                f"{m['p90_ms']:.2f} ms around p50 {m['p50_ms']:.2f}: noisy (a busy machine?); "
                "more --repeats or a quiet machine"
            )
    for warning in result.get("warnings", []):
        console.print(f"warning: {warning}", markup=False, highlight=False)
    console.print(
        f"ran on: {result['ran_on']['note']}; {prof['description']} "
        f"(process peak RSS {human_bytes(result['peak_rss_bytes'])})"
    )


def render_train(result: TrainBenchResult) -> None:
    from wasi_tool.bench.train import settings_text
    from wasi_tool.measure import pace

    table = Table(
        title="training step (forward, backward, update), synthetic input",
        caption=settings_text(result),
    )
    cols = (
        "method", "memory mode", "act ranks (first target)", "input", "median step (p10-p90)",
        "saved / step", "in targets", "peak RSS",
    )  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, m in result.methods.items():
        act = m.act_ranks_first_target
        step = f"{m.median_step_seconds * 1e3:.1f} ms"
        if m.p10_step_seconds is not None:
            step = spread(m.median_step_seconds, m.p10_step_seconds, m.p90_step_seconds)
        table.add_row(
            name,
            m.memory_mode,
            f"{'x'.join(map(str, act))} ({m.act_ranks_rule})" if act else "none",
            "x".join(map(str, m.input)),
            step,
            human_bytes(m.saved_bytes_total),
            human_bytes(m.saved_bytes_targets),
            human_bytes(m.peak_rss_bytes),
        )
    if result.ratios_by_method:
        table.add_section()
    for name, r in result.ratios_by_method.items():
        table.add_row(
            f"{name} vs {result.vs}",
            "",
            "",
            "",
            pace(r.step_speedup_vs),
            words(r.saved_bytes_ratio_vs),
            words(r.target_saved_bytes_ratio_vs),
            words(r.peak_rss_ratio_vs, "memory"),
        )
    console.print(table)
    for name, m in result.methods.items():
        if m.p10_step_seconds is not None and wide(
            m.median_step_seconds, m.p10_step_seconds, m.p90_step_seconds
        ):
            console.print(
                f"warning: {name}: the step time is noisy (p10-p90 "
                f"{m.p10_step_seconds * 1e3:.1f}-{m.p90_step_seconds * 1e3:.1f} ms around "
                f"{m.median_step_seconds * 1e3:.1f} ms; a busy machine?): more --steps, or a "
                "quiet machine"
            )
        if m.floor_rss_bytes is not None:
            console.print(
                f"{name}: library floor {human_bytes(m.floor_rss_bytes)}, peak above it "
                f"{human_bytes(m.peak_rss_bytes - m.floor_rss_bytes)}, live tensors of a step "
                f"{human_bytes(m.live_tensor_peak_bytes or 0)} (memory mode {m.memory_mode}, "
                f"allocator {m.allocator or 'unknown'})"
            )
        if m.memory_plan is not None:
            plan = m.memory_plan
            console.print(
                f"{name}: plan for {human_bytes(plan['budget_bytes'])}: memory mode "
                f"{plan['memory_mode']}, predicted peak {human_bytes(plan['predicted_peak_bytes'])}"
                f", measured {human_bytes(m.peak_rss_bytes)} "
                f"({m.peak_rss_bytes / plan['predicted_peak_bytes']:.2f}x the prediction)"
            )
