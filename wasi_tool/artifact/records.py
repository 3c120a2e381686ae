"""What an artifact says about itself, typed: its ``Manifest`` (how it was made: source, model,
the ``StageRecord`` of every stage, one ``LayerRecord`` per recorded layer, every file's
sha256) and the ``WeightsMetadata`` in its safetensors header (what rebuilds the module tree).

Each record's ``to_dict`` writes the JSON the artifact holds (the same keys, in the same order,
as every earlier version wrote) and ``from_dict`` reads it back, validated and bounded (a
manifest is read before its model is built: its lists must not make ``info`` or a load run
for minutes), refusing another format version with one line. Readers use attributes, not
string keys. Nothing read is executed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, NotRequired, TypedDict, cast

from wasi_tool._version import __version__
from wasi_tool.artifact.names import ARTIFACT_FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS_FORMAT
from wasi_tool.errors import WasiToolError
from wasi_tool.safe_read import loads_json

# Manifest-bound work is capped: far above what any model has (a 70B Llama has 560 linear
# layers; a recipe a handful of stages).
MAX_LAYERS = 20_000
MAX_STAGES = 1_000
MAX_FILES = 1_000
MAX_ACT_RANKS = 8  # dimensions of a saved activation's ranks

# The kinds of stage that write an artifact (a StageRecord's ``kind``, "stage" in the JSON).
COMPRESS = "compress"
FINETUNE = "finetune"
EXPORT = "export"
FEDERATE = "federate"
SAVE_ARTIFACT = "save_artifact"  # wasi_tool.api.save_artifact: a user's own model
STAGE_KINDS = (COMPRESS, FINETUNE, EXPORT, FEDERATE, SAVE_ARTIFACT)

# Keys a manifest of FORMAT_VERSION must have, with the type each must be.
_MANIFEST_KEYS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "format_version": int,
    "created": str,
    "versions": dict,
    "source": dict,
    "model": dict,
    "stages": list,
    "layers": list,
    "files": dict,
}


def _count(value: object, limit: int) -> bool:
    """An integer (not a bool) in 0..limit."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


# -- files -------------------------------------------------------------------------------------


class FileEntry(TypedDict):
    """A file of an artifact, as its manifest records it."""

    sha256: str
    bytes: int


def _check_file(name: object, entry: object, where: Path | str) -> FileEntry:
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(c in name for c in "/\\\0")
        or os.path.isabs(name)
    ):
        raise WasiToolError(f"{where}: files lists {name!r}, not a plain file name")
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("sha256"), str)
        or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
        or not _count(entry.get("bytes"), 1 << 50)
    ):
        raise WasiToolError(f"{where}: files entry {name!r} needs a sha256 and a byte count")
    return FileEntry(sha256=entry["sha256"], bytes=entry["bytes"])


# -- layers ------------------------------------------------------------------------------------


class HeldoutError(TypedDict):
    """A calibrated compress stage's relative output error on held-out inputs, at the rank."""

    plain: float | None
    calibrated: float | None


class LayerDict(TypedDict):
    """A ``LayerRecord`` as JSON (``heldout_error`` only where a calibration measured it)."""

    name: str
    out_features: int | None
    in_features: int | None
    rank: int | None
    act_ranks: list[int] | None
    heldout_error: NotRequired[HeldoutError]


@dataclass(frozen=True)
class LayerRecord:
    """One recorded layer: its shape, its weight rank (None when dense) and the activation
    ranks it trained with (None when it saved full activations)."""

    name: str
    out_features: int | None
    in_features: int | None
    rank: int | None = None
    act_ranks: tuple[int, ...] | None = None
    heldout_error: HeldoutError | None = None

    def to_dict(self) -> LayerDict:
        out = LayerDict(
            name=self.name,
            out_features=self.out_features,
            in_features=self.in_features,
            rank=self.rank,
            act_ranks=list(self.act_ranks) if self.act_ranks is not None else None,
        )
        if self.heldout_error is not None:
            out["heldout_error"] = self.heldout_error
        return out

    @classmethod
    def from_dict(cls, raw: object, where: Path | str = MANIFEST) -> LayerRecord:
        """The record of one ``layers`` entry; WasiToolError unless it has a name and integer
        sizes (or null) and at most MAX_ACT_RANKS activation ranks."""
        sizes = (
            [raw.get(k) for k in ("out_features", "in_features", "rank")]
            if isinstance(raw, dict)
            else [None]
        )
        act = raw.get("act_ranks") if isinstance(raw, dict) else None
        held = raw.get("heldout_error") if isinstance(raw, dict) else None
        if (
            not isinstance(raw, dict)
            or not isinstance(raw.get("name"), str)
            or len(raw["name"]) > 1000
            or not all(v is None or _count(v, 1 << 31) for v in sizes)
            or not (act is None or (isinstance(act, list) and len(act) <= MAX_ACT_RANKS))
        ):
            raise WasiToolError(
                f"{where}: a layer record needs a name and integer sizes, got {str(raw)[:80]}"
            )
        heldout = (
            HeldoutError(plain=held.get("plain"), calibrated=held.get("calibrated"))
            if isinstance(held, dict)
            else None
        )
        return cls(
            raw["name"],
            sizes[0],
            sizes[1],
            sizes[2],
            tuple(act) if act is not None else None,
            heldout,
        )


# -- stages ------------------------------------------------------------------------------------


class HeldOutRecord(TypedDict):
    samples: int
    split: str
    rows: int


class CalibrationRecord(TypedDict):
    """How a compress stage calibrated: N samples of a split of the data, their input rows,
    the damping, and the held-out samples its errors were measured on."""

    data: str
    description: str
    samples: int
    split: str
    seed: int
    damp: float
    rows: int
    held_out: HeldOutRecord | None
    inputs: str


@dataclass(frozen=True)
class StageRecord:
    """One step of an artifact's history: the kind of stage that made it (``STAGE_KINDS``;
    ``"stage"`` in the JSON), its settings, and what it recorded beside them: the data it
    trained on, a compress stage's calibration and memory budget. Keys this version does not
    know are kept in ``extra`` and written back unchanged."""

    kind: str | None  # None when a record names no stage (wasi-tool always names it)
    config: dict[str, Any] | None = None  # the stage's StageConfig.to_dict()
    data: str | None = None
    calibration: CalibrationRecord | None = None  # read back as written (an object)
    budget: Mapping[str, object] | None = None  # CompressReport.budget (a RankBudget)
    extra: dict[str, object] = field(default_factory=dict)  # unknown keys, kept as read

    def to_dict(self) -> dict[str, object]:
        """The record as JSON (keys in the order every version wrote them)."""
        out: dict[str, object] = {}
        if self.kind is not None:
            out["stage"] = self.kind
        for key in ("config", "data", "calibration", "budget"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, raw: object, where: Path | str = MANIFEST) -> StageRecord:
        if not isinstance(raw, dict):
            raise WasiToolError(f"{where}: a stage record must be an object, got {str(raw)[:80]}")
        typed = {
            "stage": str,
            "config": dict,
            "data": str,
            "calibration": dict,
            "budget": dict,
        }
        for key, kind in typed.items():
            if raw.get(key) is not None and not isinstance(raw[key], kind):
                raise WasiToolError(
                    f"{where}: a stage record's {key!r} must be a {kind.__name__}, "
                    f"got {str(raw[key])[:80]}"
                )
        return cls(
            raw.get("stage"),
            raw.get("config"),
            raw.get("data"),
            raw.get("calibration"),
            raw.get("budget"),
            {k: v for k, v in raw.items() if k not in typed},
        )


def last_kind(stages: Sequence[StageRecord], default: str = "artifact") -> str:
    """What an artifact is: the kind of its last stage (``default`` when it names none)."""
    return (stages[-1].kind if stages else None) or default


# -- the manifest ------------------------------------------------------------------------------


class ParentDict(TypedDict):
    """The artifact a model was loaded from, and the sha256 of its weights."""

    path: str
    sha256: str


class SourceDict(TypedDict, total=False):
    """Where a model came from (the manifest's "source"): its kind (random-init, state-dict,
    safetensors, pickled-module, hf-dir, gguf, wasi-tool-weights, python), file and sha256,
    and what that kind adds. A manifest's source is an open object: keys it does not know
    are kept as they are."""

    kind: str
    path: str | None
    sha256: str | None
    seed: int
    directory: str  # hf-dir
    model_class: str  # python (api.save_artifact)
    parent: ParentDict  # loaded from an artifact


def _check_source(raw: object, where: Path | str) -> SourceDict:
    if not isinstance(raw, dict) or not all(
        raw.get(k) is None or isinstance(raw[k], str) for k in ("kind", "path", "sha256")
    ):
        raise WasiToolError(f"{where}: source must be an object with a kind, path and sha256")
    return cast(SourceDict, raw)


class ModelDict(TypedDict):
    arch: str | None
    kwargs: dict[str, Any] | None


@dataclass(frozen=True)
class ModelRecord:
    """The model of an artifact: its architecture name and constructor arguments."""

    arch: str | None = None
    kwargs: dict[str, Any] | None = None

    def to_dict(self) -> ModelDict:
        return ModelDict(arch=self.arch, kwargs=self.kwargs)


def validate_manifest(manifest: object, where: Path | str = MANIFEST) -> None:
    """Raise WasiToolError unless ``manifest`` is a manifest this version can read."""
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise WasiToolError(f"{where}: not a wasi-tool manifest (format != {ARTIFACT_FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise WasiToolError(f"{where}: format_version must be an integer, got {version!r}")
    if version != FORMAT_VERSION:
        raise WasiToolError(
            f"{where}: format_version {version} is not supported by wasi-tool {__version__} "
            f"(reads version {FORMAT_VERSION})"
        )
    for key, kind in _MANIFEST_KEYS.items():
        if key not in manifest:
            raise WasiToolError(f"{where}: missing key {key!r}")
        if not isinstance(manifest[key], kind):
            raise WasiToolError(f"{where}: key {key!r} has the wrong type")
    for key, limit in (("layers", MAX_LAYERS), ("stages", MAX_STAGES), ("files", MAX_FILES)):
        if len(manifest[key]) > limit:
            raise WasiToolError(
                f"{where}: {len(manifest[key])} {key} records, more than the {limit} allowed"
            )
    kwargs = manifest["model"].get("kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise WasiToolError(f"{where}: model kwargs must be an object, got {type(kwargs).__name__}")
    for name, entry in manifest["files"].items():
        _check_file(name, entry, where)
    for layer in manifest["layers"]:
        LayerRecord.from_dict(layer, where)
    for stage in manifest["stages"]:
        StageRecord.from_dict(stage, where)
    _check_source(manifest["source"], where)
    if "federated" in manifest:
        _check_federated(manifest["federated"], where)
    outputs = manifest.get("outputs")
    if outputs is not None and not (
        isinstance(outputs, dict) and all(isinstance(v, str) for v in outputs.values())
    ):
        raise WasiToolError(f"{where}: outputs must map file names to their roles")


# -- a federated run (the manifest's "federated" entry, federated.json) ----------------------


class ClientRow(TypedDict, total=False):
    """One client in one round: what the server sent and got back, and the local figures the
    client reported (when its update was usable)."""

    node: int
    bytes_down: int
    bytes_up: int
    status: str  # ok | dropped | missing
    reason: str
    samples: float
    partition_id: float
    train_loss: float
    train_accuracy: float
    steps: float
    seconds: float
    peak_rss_bytes: float
    peak_rss_reset: float


CLIENT_METRICS = (
    "samples", "partition_id", "train_loss", "train_accuracy", "steps", "seconds",
    "peak_rss_bytes", "peak_rss_reset",
)  # fmt: skip


class RoundRecord(TypedDict):
    """One completed round: its clients, how many updates were accepted, and the global
    model's figures on the server's test split."""

    round: int
    clients: list[ClientRow]
    accepted: int
    test_loss: float | None
    test_accuracy: float | None
    seconds: float | None


class FederatedSummary(TypedDict):
    """A federated run as its artifact records it."""

    schema: str
    clients: int
    partition: str
    rounds: int
    local_epochs: int
    method: str
    data: str
    test: str
    history: list[RoundRecord]


MAX_ROUNDS = 100_000


def _check_federated(raw: object, where: Path | str) -> FederatedSummary:
    """The shape a reader relies on (an object whose history is a bounded list of objects);
    the round records themselves are checked where a run resumes from them."""
    history = raw.get("history") if isinstance(raw, dict) else None
    if (
        not isinstance(raw, dict)
        or not isinstance(history, list)
        or len(history) > MAX_ROUNDS
        or not all(isinstance(r, dict) for r in history)
    ):
        raise WasiToolError(f"{where}: federated must be an object with a list of round records")
    return cast(FederatedSummary, raw)


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: how an artifact was made. ``build`` makes the record of a model a
    stage is about to write; ``write_artifact`` completes it (creation time, versions, the
    sha256 and size of every file) and validates it before it is written."""

    source: SourceDict
    model: ModelRecord
    stages: list[StageRecord]
    layers: list[LayerRecord]
    files: dict[str, FileEntry] = field(default_factory=dict)
    outputs: dict[str, str] | None = None  # export: the role of each file
    federated: FederatedSummary | None = None  # federate: the run's summary and round history
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @classmethod
    def build(
        cls,
        source: SourceDict,
        arch: str | None,
        kwargs: Mapping[str, Any] | None,
        stages: Sequence[StageRecord],
        layers: Sequence[LayerRecord],
        *,
        outputs: Mapping[str, str] | None = None,
        federated: FederatedSummary | None = None,
    ) -> Manifest:
        """The manifest of a model with this source, architecture and arguments, whole stage
        history and per-layer records (files, time and versions come when it is written)."""
        return cls(
            source,
            ModelRecord(arch, dict(kwargs) if kwargs is not None else None),
            list(stages),
            list(layers),
            outputs=dict(outputs) if outputs is not None else None,
            federated=federated,
        )

    def completed(
        self, files: Mapping[str, FileEntry], created: str, versions: Mapping[str, str]
    ) -> Manifest:
        return replace(self, files=dict(files), created=created, versions=dict(versions))

    @property
    def kind(self) -> str:
        """What the artifact is: the kind of its last stage ("artifact" when none is named)."""
        return last_kind(self.stages)

    def to_dict(self) -> dict[str, object]:
        """``manifest.json``'s JSON (keys in the order every version wrote them)."""
        out: dict[str, object] = {
            "format": ARTIFACT_FORMAT,
            "format_version": self.format_version,
            "created": self.created,
            "versions": self.versions,
            "source": self.source,
            "model": self.model.to_dict(),
            "stages": [s.to_dict() for s in self.stages],
            "layers": [x.to_dict() for x in self.layers],
        }
        if self.outputs is not None:
            out["outputs"] = self.outputs
        if self.federated is not None:
            out["federated"] = self.federated
        out["files"] = self.files
        return out

    @classmethod
    def from_dict(cls, raw: object, where: Path | str = MANIFEST) -> Manifest:
        """The manifest ``raw`` (parsed JSON) holds; WasiToolError unless valid."""
        validate_manifest(raw, where)
        assert isinstance(raw, dict)
        model = raw["model"]
        arch = model.get("arch")
        return cls(
            source=_check_source(raw["source"], where),
            model=ModelRecord(arch if isinstance(arch, str) else None, model.get("kwargs")),
            stages=[StageRecord.from_dict(s, where) for s in raw["stages"]],
            layers=[LayerRecord.from_dict(x, where) for x in raw["layers"]],
            files={n: _check_file(n, e, where) for n, e in raw["files"].items()},
            outputs=raw.get("outputs"),
            federated=_check_federated(raw["federated"], where) if "federated" in raw else None,
            created=raw["created"],
            versions=raw["versions"],
            format_version=raw["format_version"],
        )


# -- the weights' metadata ---------------------------------------------------------------------


class FactoredShape(NamedTuple):
    """A factored layer's shape: W (out x in) as L (out x rank) R (rank x in), with a bias?"""

    out_features: int
    in_features: int
    rank: int
    bias: bool


@dataclass(frozen=True)
class WeightsMetadata:
    """The safetensors ``__metadata__`` of an artifact's weights: what rebuilds its module
    tree (the architecture, its arguments, the factored layers' shapes, BSR's token-dropping
    blocks) and the stage history. safetensors stores strings only: ``to_dict`` gives each
    value as a string (JSON with sorted keys where it is not one)."""

    arch: str
    model_kwargs: dict[str, Any]
    factored: dict[str, FactoredShape] = field(default_factory=dict)
    token_drop: dict[str, tuple[float, bool]] = field(default_factory=dict)  # {name: (keep, fuse)}
    stages: list[StageRecord] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, str]:
        values: dict[str, object] = {
            "format": WEIGHTS_FORMAT,
            "format_version": str(self.format_version),
            "arch": self.arch,
            "model_kwargs": self.model_kwargs,
            "factored": {name: list(shape) for name, shape in self.factored.items()},
        }
        if self.token_drop:  # part of the model: BSR's blocks that drop tokens
            values["token_drop"] = {name: list(spec) for name, spec in self.token_drop.items()}
        values["stages"] = [s.to_dict() for s in self.stages]
        return {
            k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in values.items()
        }

    @staticmethod
    def is_wasi(meta: Mapping[str, str]) -> bool:
        """The metadata of a safetensors file wasi-tool wrote (any version)."""
        return meta.get("format") == WEIGHTS_FORMAT

    @classmethod
    def from_dict(cls, meta: Mapping[str, str], where: Path | str) -> WeightsMetadata:
        """The metadata of wasi-tool weights; WasiToolError when malformed or of another
        format version."""
        try:
            version = int(meta.get("format_version", "-1"))
            arch = meta["arch"]
            kwargs = loads_json(meta["model_kwargs"], f"{where} metadata model_kwargs")
            factored = loads_json(meta["factored"], f"{where} metadata factored")
            if not isinstance(kwargs, dict) or not isinstance(factored, dict):
                raise ValueError("model_kwargs and factored must be JSON objects")
            shapes = {
                name: FactoredShape(int(spec[0]), int(spec[1]), int(spec[2]), bool(spec[3]))
                for name, spec in factored.items()
            }
            token_drop = {
                name: (float(spec[0]), bool(spec[1]))
                for name, spec in loads_json(
                    meta.get("token_drop", "{}"), f"{where} metadata token_drop"
                ).items()
            }
            stages = loads_json(meta.get("stages", "[]"), f"{where} metadata stages")
            if not isinstance(stages, list) or len(stages) > MAX_STAGES:
                raise ValueError(f"stages must be a list of at most {MAX_STAGES} records")
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            raise WasiToolError(f"{where}: malformed wasi-tool metadata ({exc})") from None
        if version != FORMAT_VERSION:
            raise WasiToolError(f"{where}: weights format_version {version} is not supported")
        records = [StageRecord.from_dict(s, f"{where} metadata") for s in stages]
        return cls(str(arch), kwargs, shapes, token_drop, records, version)
