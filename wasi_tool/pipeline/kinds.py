"""The stage kinds a recipe may use, in one registry: each kind's config class, its run options,
the earlier stages it reads, its extra checks, and the library call that runs it.

Adding a stage kind is one ``StageKind`` and one ``register_kind`` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wasi_tool import artifact
from wasi_tool.bench import (
    InferenceBenchConfig,
    TrainBenchConfig,
    get_profile,
    run_inference_bench,
    run_train_bench,
)
from wasi_tool.bench.train import settings_of
from wasi_tool.config import StageConfig
from wasi_tool.errors import WasiToolError
from wasi_tool.federated.config import FederateConfig
from wasi_tool.models.loading import ModelSource
from wasi_tool.pipeline.report import BENCH_FILE, REPORT_MD, write_report
from wasi_tool.pipeline.spec import Pipeline, StageSpec
from wasi_tool.stages.compress import CompressConfig, run_compress
from wasi_tool.stages.export import ExportConfig, run_export
from wasi_tool.stages.finetune import FinetuneConfig, run_finetune

Run = Callable[[StageSpec, Path, Path, Any], None]


@dataclass(frozen=True)
class StageKind:
    """How a recipe stage of this kind is read, checked and run.

    ``config``: its settings class (keys of the stage table that are its fields); ``options``:
    the other keys it takes; ``reads_model``: it needs ``input`` or ``source``; ``inputs``:
    the earlier stages whose outputs it reads (they key its reuse); ``check``: extra checks
    at load time; ``run(spec, run_dir, out, progress)`` writes ``out`` atomically.
    """

    name: str
    config: type[StageConfig] | None
    options: frozenset[str]
    run: Run
    reads_model: bool = True
    inputs: Callable[[StageSpec], list[str]] = lambda spec: [spec.input] if spec.input else []
    check: Callable[[Pipeline, StageSpec], None] | None = None

    def fields(self) -> set[str]:
        return set(self.config.setting_hints()) if self.config else set()


KINDS: dict[str, StageKind] = {}


def register_kind(kind: StageKind) -> StageKind:
    if kind.name in KINDS:
        raise ValueError(f"stage kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def _source(spec: StageSpec, run_dir: Path) -> ModelSource:
    if spec.input is not None:
        return ModelSource(checkpoint=run_dir / spec.input)
    return ModelSource(**spec.source)


def _compress(spec: StageSpec, run_dir: Path, out: Path, progress: Any) -> None:
    cfg = CompressConfig.from_dict(spec.config)
    plot = bool(spec.options.get("plot"))
    run_compress(_source(spec, run_dir), cfg, out, overwrite=True, plot=plot)


def _finetune(spec: StageSpec, run_dir: Path, out: Path, progress: Any) -> None:
    cfg = FinetuneConfig.from_dict(spec.config)
    data = spec.options["data"]
    run_finetune(_source(spec, run_dir), data, cfg, out, overwrite=True, progress=progress)


def _check_finetune(pipeline: Pipeline, spec: StageSpec) -> None:
    if "data" not in spec.options:
        raise WasiToolError("a finetune stage needs data")


def _federate(spec: StageSpec, run_dir: Path, out: Path, progress: Any) -> None:
    from wasi_tool.federated import FederateConfig, run_federate  # Flower only when used

    if spec.input is None:
        raise WasiToolError("a federate stage starts from an artifact: give it an input stage")
    cfg = FederateConfig.from_dict(spec.config)
    run_federate(
        run_dir / spec.input,
        spec.options["data"],
        cfg,
        out,
        overwrite=True,
        test_data=spec.options.get("test_data"),
    )


def _check_federate(pipeline: Pipeline, spec: StageSpec) -> None:
    if "data" not in spec.options:
        raise WasiToolError("a federate stage needs data")
    if spec.input is None:
        raise WasiToolError("a federate stage needs an input stage (its starting artifact)")


def _export(spec: StageSpec, run_dir: Path, out: Path, progress: Any) -> None:
    run_export(_source(spec, run_dir), ExportConfig.from_dict(spec.config), out, overwrite=True)


# a bench stage with train = true takes every TrainBenchConfig setting (a method's options
# too, by their flat keys) but the model source (its input stage) and what like = fills in
NOT_BENCH_OPTIONS = ("checkpoint", "arch", "num_classes", "img_size", "random_init")
TRAIN_BENCH_OPTIONS = tuple(
    k
    for k in TrainBenchConfig.setting_hints()
    if k not in (*NOT_BENCH_OPTIONS, "settings_from", "act_ranks_by_layer")
)


def _bench_inputs(spec: StageSpec) -> list[str]:
    vs = spec.options.get("vs")
    compared = [vs] if vs and not spec.options.get("train") else []  # --train: vs is a method
    like = [str(spec.options["like"])] if spec.options.get("like") else []
    return [*([spec.input] if spec.input else []), *compared, *like]


def _check_bench(pipeline: Pipeline, spec: StageSpec) -> None:
    if spec.input is None:
        raise WasiToolError("a bench stage needs an input stage")
    for ref in _bench_inputs(spec):
        if ref not in [s.name for s in pipeline.stages]:
            raise WasiToolError(f"refers to unknown stage {ref!r}")
    if spec.options.get("like") and not spec.options.get("train"):
        raise WasiToolError("like (train what a fine-tune stage trained) needs train = true")
    if spec.options.get("train"):
        _train_bench_config(spec, Path("."), ran=False)


def _train_bench_config(spec: StageSpec, run_dir: Path, ran: bool = True) -> TrainBenchConfig:
    """The training bench's settings: the stage's options over, with ``like``, what that
    fine-tune stage trained with (its targets, calibrated activation ranks per layer, eps,
    baseline options), over TrainBenchConfig's defaults. ``ran``: the earlier stages have
    run (at load time, only the stage's own options are checked)."""
    given = {k: spec.options[k] for k in TRAIN_BENCH_OPTIONS if k in spec.options}
    like: dict[str, object] = {}
    if spec.options.get("like") and ran:
        found = settings_of(run_dir / str(spec.options["like"]))
        if found is None:
            raise WasiToolError(f"like: stage {spec.options['like']!r} is not a fine-tune")
        like = {**found, "settings_from": f"fine-tune stage {spec.options['like']!r}"}
    return TrainBenchConfig.from_dict(
        {"checkpoint": str(run_dir / str(spec.input)), **like, **given}
    )


def _bench(spec: StageSpec, run_dir: Path, out: Path, progress: Any) -> None:
    opts = spec.options
    result: dict[str, Any]
    if opts.get("train"):
        note = getattr(progress, "note", None)
        train = run_train_bench(_train_bench_config(spec, run_dir), opts.get("vs"), note=note)
        result = {**train.to_dict(), "kind": "train"}
    else:
        vs = opts.get("vs")
        defaults = InferenceBenchConfig()
        result = run_inference_bench(
            run_dir / str(spec.input) / artifact.ONNX,
            run_dir / vs / artifact.ONNX if vs else None,
            get_profile(str(opts.get("device", "host"))),
            InferenceBenchConfig(
                batch_size=int(opts.get("batch_size", defaults.batch_size)),
                warmup=int(opts.get("warmup", defaults.warmup)),
                repeats=int(opts.get("repeats", defaults.repeats)),
            ),
        )
        result["kind"] = "inference"
        result["stages"] = [spec.input, *([vs] if vs else [])]
    with artifact.atomic_directory(out, overwrite=True, replaceable=_stage_output) as staging:
        artifact.write_json(staging / BENCH_FILE, result)


def _report_inputs(spec: StageSpec) -> list[str]:
    return list(spec.options["stages"])


def _check_report(pipeline: Pipeline, spec: StageSpec) -> None:
    earlier = [s.name for s in pipeline.stages[: pipeline.stages.index(spec)]]
    spec.options.setdefault("stages", earlier)
    missing = [n for n in spec.options["stages"] if n not in earlier]
    if missing:
        raise WasiToolError(f"reports on unknown or later stage(s) {missing}")


def _report(spec: StageSpec, run_dir: Path, out: Path, progress: Any) -> None:
    names = list(spec.options.get("stages") or [])
    title = str(spec.options.get("title", "wasi-tool report"))
    with artifact.atomic_directory(out, overwrite=True, replaceable=_stage_output) as staging:
        write_report(run_dir, names, staging, title)


def _stage_output(path: Path) -> bool:
    """What a stage of a run wrote (an artifact, a bench or a report directory): the only
    directories a re-run may replace."""
    return artifact.is_wasi_artifact(path) or any(
        (path / name).is_file() for name in (BENCH_FILE, REPORT_MD)
    )


register_kind(StageKind("compress", CompressConfig, frozenset({"plot"}), _compress))
register_kind(
    StageKind("finetune", FinetuneConfig, frozenset({"data"}), _finetune, check=_check_finetune)
)
register_kind(
    StageKind(
        "federate",
        FederateConfig,
        frozenset({"data", "test_data"}),
        _federate,
        check=_check_federate,
    )
)
register_kind(StageKind("export", ExportConfig, frozenset(), _export))
register_kind(
    StageKind(
        "bench",
        None,
        frozenset({"vs", "device", "repeats", "train", "like", *TRAIN_BENCH_OPTIONS}),
        _bench,
        reads_model=False,
        inputs=_bench_inputs,
        check=_check_bench,
    )
)
register_kind(
    StageKind(
        "report",
        None,
        frozenset({"stages", "title"}),
        _report,
        reads_model=False,
        inputs=_report_inputs,
        check=_check_report,
    )
)
