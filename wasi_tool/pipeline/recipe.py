"""Reading a recipe: a declarative TOML file of stages, parsed and validated before any runs.

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

import copy
import dataclasses
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from wasi_tool.errors import WasiToolError
from wasi_tool.models.loading import ModelSource
from wasi_tool.pipeline.kinds import KINDS
from wasi_tool.pipeline.spec import Pipeline, StageSpec
from wasi_tool.safe_read import loads_toml, read_text

SOURCE_KEYS = {f.name for f in dataclasses.fields(ModelSource)}
RESERVED = {"name", "kind", "input", "source"}
MAX_RECIPE_BYTES = 1024 * 1024
# a stage's output folder is <run>/<name>: no separators, no '.', '..' or hidden names, no
# control characters, nothing a shell or the file system reads as more than a name
STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (parsed from TOML) has the type a config field declares; a type form
    this does not know is accepted (the config's own validation still runs)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, list | tuple) and all(_fits(v, args[0]) for v in value if args)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    return True


def _check_type(kind: str, key: str, value: Any, where: str) -> None:
    """A recipe or --set value must have the type its config field declares (TOML's "yes"
    is not a bool: it would read as true)."""
    config_cls = KINDS[kind].config
    hints = config_cls.setting_hints() if config_cls is not None else {}
    if key in hints and not _fits(value, hints[key]):
        raise WasiToolError(f"{where} takes {_type_name(hints[key])}, got {value!r}")


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


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
        return loads_toml(f"v = {text}", "a --set value")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_pipeline(path: Path, overrides: list[str] | None = None) -> Pipeline:
    """Read and validate a recipe; ``overrides`` are ``stage.key=value`` strings."""
    path = Path(path)
    if not path.is_file() and not path.is_dir():
        raise WasiToolError(f"no such recipe: {path}")
    text = read_text(path, f"recipe {path}", max_bytes=MAX_RECIPE_BYTES)
    try:
        data = loads_toml(text, f"recipe {path}")
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
    if not isinstance(head, dict):
        raise WasiToolError(f"{path}: [pipeline] must be a table")
    # without a name, the file's stem made plain ("my recipe.toml" -> my_recipe)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem).lstrip(".-")[:100] or "run"
    name = head.get("name", stem)
    if not isinstance(name, str) or not STAGE_NAME.fullmatch(name):
        raise WasiToolError(
            f"{path}:{_line_of(text, 'name')}: the pipeline needs a plain name of letters, "
            f"digits, _ . - (not starting with . or -; it names the folder runs/<name>/), "
            f"got {name!r}"
        )
    pipeline = Pipeline(name, str(head.get("description", "")), stages, path)
    as_written = copy.deepcopy(pipeline)
    for item in overrides or []:
        _override(pipeline, item)
    for spec, written in zip(pipeline.stages, as_written.stages, strict=True):
        try:
            _validate(pipeline, spec)
        except WasiToolError as exc:
            items = [i for i in overrides or [] if _stage_of(i) == spec.name]
            if not items:
                raise
            try:  # valid as the recipe wrote it: the --set values are at fault
                _validate(as_written, written)
            except WasiToolError:
                raise exc from None
            where = f"{pipeline.path}:{spec.line}: stage {spec.name!r}: "
            message = str(exc).removeprefix(where)
            raise WasiToolError(f"--set {', --set '.join(items)}: {message}") from None
    return pipeline


def _stage_of(item: str) -> str:
    return item.partition("=")[0].strip().partition(".")[0]


def _stage(path: Path, text: str, raw: dict[str, Any], line: int, earlier: list[str]) -> StageSpec:
    where = f"{path}:{line}"
    name, kind = raw.get("name"), raw.get("kind")
    if not isinstance(name, str) or not STAGE_NAME.fullmatch(name):
        raise WasiToolError(
            f"{where}: each stage needs a plain name of letters, digits, _ . - (not starting "
            f"with . or -; it names the folder <run>/<name>/), got {name!r}"
        )
    if name in earlier:
        raise WasiToolError(f"{where}: stage name {name!r} is used twice")
    if kind not in KINDS:
        raise WasiToolError(f"{where}: stage {name!r} has kind {kind!r}; use {', '.join(KINDS)}")
    source = raw.get("source", {})
    if not isinstance(source, dict) or set(source) - SOURCE_KEYS:
        bad = sorted(set(source) - SOURCE_KEYS) if isinstance(source, dict) else ["source"]
        raise WasiToolError(f"{path}:{_line_of(text, 'source', line)}: unknown source key(s) {bad}")
    inp = raw.get("input")
    if inp is not None and inp not in earlier:
        raise WasiToolError(f"{where}: stage {name!r} reads {inp!r}, which is not an earlier stage")
    fields = KINDS[kind].fields()
    config, options = {}, {}
    for key, value in raw.items():
        if key in RESERVED:
            continue
        if key in KINDS[kind].options:
            options[key] = value
        elif key in fields:
            _check_type(kind, key, value, f"{path}:{_line_of(text, key, line)}: {key}")
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
    fields = KINDS[spec.kind].fields()
    if key in KINDS[spec.kind].options:
        spec.options[key] = parsed
    elif key in fields:
        _check_type(spec.kind, key, parsed, f"--set {item}: {key}")
        spec.config[key] = parsed
    elif key.startswith("source.") and key[7:] in SOURCE_KEYS:
        spec.source[key[7:]] = parsed
    else:
        raise WasiToolError(f"--set {item}: a {spec.kind} stage has no setting {key!r}")


def _validate(pipeline: Pipeline, spec: StageSpec) -> None:
    """Build the config once, so a bad value fails before any stage runs."""
    kind = KINDS[spec.kind]
    where = f"{pipeline.path}:{spec.line}: stage {spec.name!r}"
    try:
        if kind.config is not None:
            kind.config.from_dict(spec.config)
        if spec.input is None and kind.reads_model:
            ModelSource(**spec.source)
            if not spec.source:
                raise WasiToolError("needs an input stage or a source table")
        if kind.check is not None:
            kind.check(pipeline, spec)
    except WasiToolError as exc:
        raise WasiToolError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:  # a value of the wrong type the config converts
        raise WasiToolError(f"{where}: {exc}") from None
