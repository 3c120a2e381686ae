"""What every command shares: loading flags, defaults from config dataclasses, error handling."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from rich.console import Console

from wasi_tool.cli.defaults import ConfigDefaults
from wasi_tool.errors import WasiToolError

if TYPE_CHECKING:  # torch: imported when a command runs, not to parse its flags
    from wasi_tool.models.loading import ModelSource

# Piped output (logs, CI) gets a wide table instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, soft_wrap=True)


def default(config_cls: type | ConfigDefaults, name: str) -> Any:
    """The default of dataclass field ``name``: CLI defaults are read, never copied by hand
    (from wasi_tool.cli.defaults, the torch-free copy tests check against the dataclass)."""
    if isinstance(config_cls, ConfigDefaults):
        return getattr(config_cls, name)
    for f in dataclasses.fields(config_cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise KeyError(name)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner on a terminal; otherwise (CI logs, ``| tee``) a plain line before and after,
    so a log says what the command is doing while it does it."""
    if console.is_terminal:
        with console.status(message):
            yield
        return
    console.print(message, markup=False, highlight=False)
    start = time.perf_counter()
    yield
    console.print(
        f"{message.rstrip('.')}: done in {time.perf_counter() - start:.1f} s",
        markup=False,
        highlight=False,
    )


# The parameters through which a command writes: every other parameter that names an existing
# file or directory is an input, which no output may overwrite (artifacts.command_inputs).
OUTPUT_PARAMS = {"out": "dir", "json_path": "file", "predictions": "file"}
# Commands whose --out is a folder they write into, never replace as a whole (run's stages).
CONTAINER_OUT = {"run"}


def _command_io() -> tuple[list[Any], dict[str, Any]]:
    """The running command's path-like parameters (its inputs) and its outputs, by kind."""
    ctx = click.get_current_context(silent=True)
    params = ctx.params if ctx is not None else {}
    inputs: list[Any] = []
    for name, value in params.items():
        if name in OUTPUT_PARAMS:
            continue
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, str | Path) and str(item) not in ("", "-"):
                inputs.append(item)
    # typer converts a Path parameter when it calls the command; the context holds the text
    outputs = {k: Path(params[k]) for k in OUTPUT_PARAMS if isinstance(params.get(k), str | Path)}
    if ctx is not None and ctx.info_name in CONTAINER_OUT and "out" in outputs:
        outputs["out_folder"] = outputs.pop("out")
    return inputs, outputs


def _check_outputs(outputs: dict[str, Any]) -> None:
    if not outputs:
        return
    from wasi_tool import artifact as artifacts

    for name, path in outputs.items():
        if name == "out_folder":  # written into: each output inside it is checked as written
            artifacts.check_output_path(path)
        elif OUTPUT_PARAMS[name] == "dir":
            artifacts.check_output_path(path, directory=True)
        elif not is_stdout(path):
            artifacts.check_output_file(path)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a WasiToolError into one line on stderr and exit code 1. Python warnings raised
    meanwhile (torch's UserWarnings while a file is refused) are held back: dropped when the
    command fails with that one line, shown as usual when it succeeds or fails otherwise.

    It is also the command's scope for the output-path rule: its path parameters are its
    inputs, and its outputs are checked against them before any work is done."""
    failed: WasiToolError | None = None
    held: list[warnings.WarningMessage] = []
    inputs, outputs = _command_io()
    scope: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    # artifacts loads torch: not for --help, usage errors, --version or the root's options
    # (os.path.lexists: a text parameter such as a 1 MB prompt is no path and no error)
    if outputs or any(os.path.lexists(str(item)) for item in inputs):
        from wasi_tool import artifact as artifacts

        scope = artifacts.command_inputs(inputs)
    try:
        with warnings.catch_warnings(record=True) as held, scope:
            try:
                _check_outputs(outputs)
            except WasiToolError as exc:  # before the command's body: it must not run
                err_console.print(f"error: {exc}", markup=False, highlight=False)
                raise typer.Exit(1) from None
            try:
                yield
            except WasiToolError as exc:
                failed = exc
    finally:
        if failed is None:
            for w in held:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if failed is not None:
        err_console.print(f"error: {failed}", markup=False, highlight=False)
        raise typer.Exit(1) from None


DATA_HELP = (
    "digits (built in), a .npz with x_train/y_train/x_test/y_test, a CIFAR batch folder, or an "
    "image-folder tree root/<class>/*.jpg; text: emoji-lang[:N] (classify), "
    "emoji-translate[:N[:de,fr]], a .txt or a .jsonl (causal-lm)."
)

JsonOut = Annotated[
    Path | None,
    typer.Option(
        "--json",
        help="Write every figure as JSON to this file ('-': to stdout, instead of the table).",
        show_default=False,
    ),
]


def write_report_json(path: Path | None, out: Path, name: str) -> None:
    """``--json`` of a command that writes an artifact: the figures it recorded there
    (``name``: report.json, metrics.json, federated.json), with where the artifact is."""
    if path is None:
        return
    try:
        figures = json.loads((out / name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WasiToolError(f"cannot read {out / name}: {exc}") from None
    write_json(path, {"out": str(out), name.removesuffix(".json"): figures})


@contextlib.contextmanager
def progress_to_stderr(json_path: Path | None) -> Iterator[None]:
    """With ``--json -`` stdout carries the JSON alone: progress and notes go to stderr."""
    if not is_stdout(json_path):
        yield
        return
    # rich's Console.file falls back to the *current* sys.stdout when unset; restore "unset",
    # not the stream of the moment (a test runner swaps sys.stdout per invocation)
    before = console._file
    console.file = sys.stderr
    try:
        yield
    finally:
        console._file = before


def is_stdout(path: Path | None) -> bool:
    return path is not None and str(path) == "-"


def write_json(path: Path | None, payload: Any) -> None:
    """``--json PATH``: the payload to PATH, or to stdout for ``-``; nothing for None."""
    from wasi_tool.artifact import dumps_json

    if path is None:
        return
    text = dumps_json(json.loads(json.dumps(payload, default=str)))
    if is_stdout(path):
        sys.stdout.write(text)
        return
    from wasi_tool import artifact as artifacts

    artifacts.write_file(path, text)  # the output-path rule, an atomic write


Checkpoint = Annotated[
    Path | None,
    typer.Argument(
        help="Checkpoint: .safetensors, .pt/.pth state dict, a Hugging Face directory, a .gguf "
        "file, or a wasi-tool artifact directory.",
        show_default=False,
    ),
]
Arch = Annotated[
    str | None,
    typer.Option(
        help="timm architecture, e.g. vit_base_patch32_224, or torchvision:vit_b_32 / "
        "torchvision:swin_t (if the checkpoint does not say)."
    ),
]
NumClasses = Annotated[
    int | None,
    typer.Option(help="Classes of the checkpoint's head (read from the weights if not given)."),
]
ImgSize = Annotated[
    int | None, typer.Option(help="Input size, when it differs from the arch default.")
]
TrustPickle = Annotated[
    bool, typer.Option(help="Allow pickled checkpoints (can run code: only for trusted files).")
]
RandomInit = Annotated[
    bool, typer.Option(help="No checkpoint: a randomly initialised --arch (for trying the tool).")
]
Task = Annotated[
    str | None,
    typer.Option(
        help="Hugging Face models: causal-lm (next-token) | classify (default: causal-lm for a "
        "*ForCausalLM directory or a .gguf file, else classify)."
    ),
]
Threads = Annotated[
    int | None,
    typer.Option(
        help="CPU threads for torch's kernels (default: one per core). Fewer can be faster when "
        "other jobs share the cores.",
        show_default=False,
    ),
]
SeedInit = Annotated[
    int, typer.Option("--seed-init", help="Seed of --random-init (the weights it draws).")
]

ModelClass = Annotated[
    str | None,
    typer.Option(
        help="pkg.mod:Class of a custom model's artifact: imported and run to rebuild it "
        "(only name classes you trust)."
    ),
]


def model_source(
    checkpoint: Path | None,
    arch: str | None,
    num_classes: int | None,
    img_size: int | None,
    trust_pickle: bool,
    random_init: bool,
    seed: int,
    *,
    task: str | None = None,
    model_class: str | None = None,
) -> ModelSource:
    from wasi_tool.models.loading import ModelSource

    return ModelSource(
        task=task,
        checkpoint=checkpoint,
        arch=arch,
        num_classes=num_classes,
        img_size=img_size,
        trust_pickle=trust_pickle,
        random_init=random_init,
        seed=seed,
        model_class=model_class,
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def human_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
