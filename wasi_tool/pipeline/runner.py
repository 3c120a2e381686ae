"""Running a recipe: stages in order under a run directory, each reused when its key (a hash
of its kind, settings and inputs) is unchanged."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wasi_tool import artifact
from wasi_tool.errors import WasiToolError
from wasi_tool.pipeline.kinds import KINDS
from wasi_tool.pipeline.spec import Pipeline
from wasi_tool.safe_read import read_json

PIPELINE_FILE = artifact.PIPELINE


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
            payload["sha256"] = artifact.sha256_file(p)
        elif artifact.is_artifact_dir(p):
            payload["manifest"] = (p / artifact.MANIFEST).read_text()
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
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / pipeline.name
    created = _first_missing(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _run_stages(pipeline, run_dir, force, on_stage, progress)
    except BaseException:
        # a run that fails before it wrote anything leaves no directory behind (a stage's
        # artifact is written atomically; an interrupted fine-tune's checkpoint is a file, kept)
        if created is not None and not any(p.is_file() for p in created.rglob("*")):
            shutil.rmtree(created, ignore_errors=True)
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost directory that ``path.mkdir(parents=True)`` would create, if any."""
    missing = None
    for p in [path.absolute(), *path.absolute().parents]:
        if p.exists():
            break
        missing = p
    return missing


def _run_stages(
    pipeline: Pipeline,
    run_dir: Path,
    force: bool,
    on_stage: Callable[[StageRecord], None] | None,
    progress: Any,
) -> list[StageRecord]:
    previous = _read_state(run_dir)
    keys: dict[str, str] = {}
    records: list[StageRecord] = []
    for spec in pipeline.stages:
        kind = KINDS[spec.kind]
        inputs = kind.inputs(spec)
        payload = {
            **spec.settings(),
            "inputs": [keys[i] for i in inputs if i in keys],
            "source": _source_payload(spec.source) if spec.input is None else None,
        }
        key = _hash(payload)
        keys[spec.name] = key
        out = run_dir / spec.name
        old = previous.get(spec.name)
        start = time.perf_counter()
        reused = not force and old is not None and old.key == key and out.exists()
        if not reused:
            if progress is not None:  # said before a stage that may run for minutes
                progress.note(f"{spec.name} ({spec.kind}): running...")
            kind.run(spec, run_dir, out, progress)
        record = StageRecord(
            spec.name,
            spec.kind,
            key,
            reused,
            round(old.seconds if old is not None and reused else time.perf_counter() - start, 3),
            str(out),
            spec.settings(),
        )
        records.append(record)
        _write_state(run_dir, pipeline, records, previous)
        if on_stage is not None:
            on_stage(record)
    return records


def _read_state(run_dir: Path) -> dict[str, StageRecord]:
    """The stage records of the last run in ``run_dir`` (pipeline.json), by name."""
    path = run_dir / PIPELINE_FILE
    if not path.is_file():
        return {}
    try:
        found = {}
        for raw in read_json(path)["stages"]:
            record = StageRecord(**raw)
            if not (
                isinstance(record.name, str)
                and isinstance(record.key, str)
                and isinstance(record.seconds, int | float)
            ):
                raise TypeError("not a stage record")
            found[record.name] = record
        return found
    except (WasiToolError, ValueError, KeyError, TypeError):
        return {}  # an unreadable record only means nothing is reused


def _write_state(
    run_dir: Path,
    pipeline: Pipeline,
    records: list[StageRecord],
    previous: dict[str, StageRecord],
) -> None:
    done = {r.name for r in records}
    later = [
        dataclasses.asdict(v)
        for k, v in previous.items()
        if k not in done and k in {s.name for s in pipeline.stages}
    ]
    payload = {
        "pipeline": pipeline.name,
        "description": pipeline.description,
        "recipe": str(pipeline.path),
        "updated": artifact.now_iso(),
        "versions": artifact.versions(),
        "stages": [dataclasses.asdict(r) for r in records] + later,
    }
    tmp = run_dir / f".{PIPELINE_FILE}.tmp"
    tmp.write_text(artifact.dumps_json(payload))
    tmp.replace(run_dir / PIPELINE_FILE)
