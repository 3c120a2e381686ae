"""Pipelines: stages chained from a declarative TOML recipe, each reused when nothing changed.

A recipe is ``[pipeline]`` (name, description) and an ordered list of ``[[stages]]``. Each stage
has a ``name``, a ``kind`` (compress, finetune, export, bench, report) and either ``input`` (the
name of an earlier stage whose output it reads) or ``source`` (a table of model-loading fields:
checkpoint, arch, num_classes, img_size, random_init, seed). Every other key is a field of the
kind's config dataclass (the same names as the CLI flags, validated the same way) or one of the
kind's few run options (compress: plot; finetune: data; bench: vs, device, repeats, warmup,
batch_size, train, method, steps; report: stages). Stage outputs go to ``<run>/<name>/``; a stage
whose key (a hash of its kind, settings and input) is unchanged is reused unless ``force``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from wasi_tool import artifacts
from wasi_tool.errors import WasiToolError
from wasi_tool.models.loading import ModelSource
from wasi_tool.stages.compress import CompressConfig
from wasi_tool.stages.export import ExportConfig
from wasi_tool.stages.finetune import FinetuneConfig

PIPELINE_FILE = "pipeline.json"
SOURCE_KEYS = {f.name for f in dataclasses.fields(ModelSource)}
CONFIGS: dict[str, type | None] = {
    "compress": CompressConfig,
    "finetune": FinetuneConfig,
    "export": ExportConfig,
    "bench": None,
    "report": None,
}
OPTIONS: dict[str, set[str]] = {
    "compress": {"plot"},
    "finetune": {"data"},
    "export": set(),
    "bench": {"vs", "device", "repeats", "warmup", "batch_size", "train", "method", "steps"},
    "report": {"stages", "title"},
}
RESERVED = {"name", "kind", "input", "source"}


@dataclass
class StageSpec:
    name: str
    kind: str
    input: str | None
    source: dict[str, Any]
    config: dict[str, Any]
    options: dict[str, Any]
    line: int = 0

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.config, "options": self.options}


@dataclass
class Pipeline:
    name: str
    description: str
    stages: list[StageSpec]
    path: Path

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise WasiToolError(f"{self.path}: no stage named {name!r}")


def _line_of(text: str, key: str, after: int = 0) -> int:
    """1-based line of the first ``key =`` at or after line ``after`` (0 if not found)."""
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for i, line in enumerate(text.splitlines()[max(0, after - 1) :], start=max(1, after)):
        if pattern.match(line):
            return i
    return 0


def _stage_lines(text: str) -> list[int]:
    return [i for i, ln in enumerate(text.splitlines(), start=1) if ln.strip() == "[[stages]]"]


def parse_value(text: str) -> Any:
    """A ``--set`` value as a TOML literal (``0.9``, ``true``, ``[5, 6]``), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_pipeline(path: Path, overrides: list[str] | None = None) -> Pipeline:
    """Read and validate a recipe; ``overrides`` are ``stage.key=value`` strings."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WasiToolError(f"no such recipe: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WasiToolError(f"cannot read {path}: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise WasiToolError(f"{path}: TOML syntax error: {exc}") from None
    unknown_top = set(data) - {"pipeline", "stages"}
    if unknown_top:
        key = sorted(unknown_top)[0]
        raise WasiToolError(f"{path}:{_line_of(text, key)}: unknown top-level key {key!r}")
    head = data.get("pipeline", {})
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise WasiToolError(f"{path}: a recipe needs at least one [[stages]] table")
    starts = _stage_lines(text)
    stages: list[StageSpec] = []
    for index, raw in enumerate(raw_stages):
        line = starts[index] if index < len(starts) else 0
        stages.append(_stage(path, text, dict(raw), line, [s.name for s in stages]))
    pipeline = Pipeline(
        str(head.get("name", path.stem)), str(head.get("description", "")), stages, path
    )
    for item in overrides or []:
        _override(pipeline, item)
    for spec in pipeline.stages:
        _validate(pipeline, spec)
    return pipeline


def _stage(path: Path, text: str, raw: dict[str, Any], line: int, earlier: list[str]) -> StageSpec:
    where = f"{path}:{line}"
    name, kind = raw.get("name"), raw.get("kind")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise WasiToolError(f"{where}: each stage needs a name of letters, digits, _ . -")
    if name in earlier:
        raise WasiToolError(f"{where}: stage name {name!r} is used twice")
    if kind not in CONFIGS:
        raise WasiToolError(f"{where}: stage {name!r} has kind {kind!r}; use {', '.join(CONFIGS)}")
    source = raw.get("source", {})
    if not isinstance(source, dict) or set(source) - SOURCE_KEYS:
        bad = sorted(set(source) - SOURCE_KEYS) if isinstance(source, dict) else ["source"]
        raise WasiToolError(f"{path}:{_line_of(text, 'source', line)}: unknown source key(s) {bad}")
    inp = raw.get("input")
    if inp is not None and inp not in earlier:
        raise WasiToolError(f"{where}: stage {name!r} reads {inp!r}, which is not an earlier stage")
    cfg_cls = CONFIGS[kind]
    fields = {f.name for f in dataclasses.fields(cfg_cls)} if cfg_cls else set()
    config, options = {}, {}
    for key, value in raw.items():
        if key in RESERVED:
            continue
        if key in OPTIONS[kind]:
            options[key] = value
        elif key in fields:
            config[key] = value
        else:
            raise WasiToolError(
                f"{path}:{_line_of(text, key, line)}: unknown key {key!r} for a {kind} stage"
            )
    return StageSpec(name, kind, inp, dict(source), config, options, line)


def _override(pipeline: Pipeline, item: str) -> None:
    target, sep, value = item.partition("=")
    stage_name, dot, key = target.strip().partition(".")
    if not sep or not dot or not key:
        raise WasiToolError(f"--set takes stage.key=value, got {item!r}")
    spec = pipeline.stage(stage_name)
    parsed = parse_value(value.strip())
    cfg_cls = CONFIGS[spec.kind]
    fields = {f.name for f in dataclasses.fields(cfg_cls)} if cfg_cls else set()
    if key in OPTIONS[spec.kind]:
        spec.options[key] = parsed
    elif key in fields:
        spec.config[key] = parsed
    elif key.startswith("source.") and key[7:] in SOURCE_KEYS:
        spec.source[key[7:]] = parsed
    else:
        raise WasiToolError(f"--set {item}: a {spec.kind} stage has no setting {key!r}")


def _validate(pipeline: Pipeline, spec: StageSpec) -> None:
    """Build the config once, so a bad value fails before any stage runs."""
    cfg_cls = CONFIGS[spec.kind]
    where = f"{pipeline.path}:{spec.line}: stage {spec.name!r}"
    try:
        if cfg_cls is not None:
            cfg_cls.from_dict(spec.config)  # type: ignore[attr-defined]
        if spec.input is None and spec.kind in ("compress", "finetune", "export"):
            ModelSource(**spec.source)
            if not spec.source:
                raise WasiToolError("needs an input stage or a source table")
    except WasiToolError as exc:
        raise WasiToolError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise WasiToolError(f"{where}: {exc}") from None
    if spec.kind == "report":
        earlier = [s.name for s in pipeline.stages[: pipeline.stages.index(spec)]]
        spec.options.setdefault("stages", earlier)
        missing = [n for n in spec.options["stages"] if n not in earlier]
        if missing:
            raise WasiToolError(f"{where}: reports on unknown or later stage(s) {missing}")
    if spec.kind == "finetune" and "data" not in spec.options:
        raise WasiToolError(f"{where}: a finetune stage needs data")
    if spec.kind == "bench":
        for ref in (spec.input, spec.options.get("vs") if not spec.options.get("train") else None):
            if ref is not None and ref not in [s.name for s in pipeline.stages]:
                raise WasiToolError(f"{where}: refers to unknown stage {ref!r}")


@dataclass
class StageRecord:
    name: str
    kind: str
    key: str
    reused: bool
    seconds: float
    output: str
    settings: dict[str, Any] = field(default_factory=dict)


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def _source_payload(source: dict[str, Any]) -> dict[str, Any]:
    payload = dict(source)
    ckpt = source.get("checkpoint")
    if ckpt:
        p = Path(ckpt)
        if p.is_file():
            payload["sha256"] = artifacts.sha256_file(p)
        elif artifacts.is_artifact_dir(p):
            payload["manifest"] = (p / artifacts.MANIFEST).read_text()
    return payload


def run_pipeline(
    pipeline: Pipeline,
    run_dir: Path | None = None,
    *,
    force: bool = False,
    on_stage: Callable[[StageRecord], None] | None = None,
    progress: Any = None,
) -> list[StageRecord]:
    """Run the stages in order under ``run_dir`` (default ``runs/<pipeline name>``)."""
    from wasi_tool.pipeline_stages import run_stage

    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / pipeline.name
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = _read_state(run_dir)
    keys: dict[str, str] = {}
    records: list[StageRecord] = []
    for spec in pipeline.stages:
        inputs = [spec.input] if spec.input else []
        if spec.kind == "bench" and spec.options.get("vs") and not spec.options.get("train"):
            inputs.append(spec.options["vs"])
        if spec.kind == "report":
            inputs = list(spec.options["stages"])
        payload = {
            **spec.settings(),
            "inputs": [keys[i] for i in inputs if i in keys],
            "source": _source_payload(spec.source) if spec.input is None else None,
        }
        key = _hash(payload)
        keys[spec.name] = key
        out = run_dir / spec.name
        old = previous.get(spec.name, {})
        start = time.perf_counter()
        reused = not force and old.get("key") == key and out.exists()
        if not reused:
            run_stage(spec, run_dir, out, progress)
        record = StageRecord(
            spec.name,
            spec.kind,
            key,
            reused,
            round(old.get("seconds", 0.0) if reused else time.perf_counter() - start, 3),
            str(out),
            spec.settings(),
        )
        records.append(record)
        _write_state(run_dir, pipeline, records, previous)
        if on_stage is not None:
            on_stage(record)
    return records


def _read_state(run_dir: Path) -> dict[str, dict[str, Any]]:
    path = run_dir / PIPELINE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {s["name"]: s for s in data["stages"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # an unreadable record only means nothing is reused


def _write_state(
    run_dir: Path, pipeline: Pipeline, records: list[StageRecord], previous: dict[str, Any]
) -> None:
    done = {r.name for r in records}
    later = [
        v for k, v in previous.items() if k not in done and k in {s.name for s in pipeline.stages}
    ]
    payload = {
        "pipeline": pipeline.name,
        "description": pipeline.description,
        "recipe": str(pipeline.path),
        "updated": artifacts.now_iso(),
        "versions": artifacts.versions(),
        "stages": [dataclasses.asdict(r) for r in records] + later,
    }
    tmp = run_dir / f".{PIPELINE_FILE}.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(run_dir / PIPELINE_FILE)
