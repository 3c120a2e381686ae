"""`wasi-tool doctor`: does this device (or another one) run the installed wheels?

It imports neither torch nor wasi_tool.cli.common (which loads torch): where torch dies at
import, ``python3 -m wasi_tool doctor`` must still answer (``wasi_tool/__main__.py`` starts it
without the rest of the CLI).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from wasi_tool.device import PACKAGES
from wasi_tool.errors import WasiToolError

if TYPE_CHECKING:
    from wasi_tool.doctor import DoctorReport

console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)
err_console = Console(stderr=True, soft_wrap=True)

_MARK = {"ok": "ok", "note": "note", "problem": "PROBLEM"}


def doctor(
    json_path: Annotated[
        Path | None,
        typer.Option(
            "--json",
            help="Write the findings as JSON to this file ('-': to stdout, instead of the table).",
            show_default=False,
        ),
    ] = None,
    cpuinfo: Annotated[
        Path | None,
        typer.Option(
            help="Judge the CPU of this /proc/cpuinfo copy (another device's) instead of "
            "this machine's; no import checks.",
            show_default=False,
        ),
    ] = None,
    assume: Annotated[
        str | None,
        typer.Option(
            help="Check these versions instead of the installed ones, e.g. "
            "torch==2.10.1,onnxruntime==1.21.0 (no import checks).",
            show_default=False,
        ),
    ] = None,
    ssh: Annotated[
        str | None,
        typer.Option(help="Run on a device: user@host[:port] (its python3; no wasi-tool needed)."),
    ] = None,
    ssh_key: Annotated[Path | None, typer.Option(help="Identity file for --ssh.")] = None,
    known_hosts: Annotated[
        Path | None, typer.Option(help="known_hosts file for --ssh (host keys are checked).")
    ] = None,
    remote_python: Annotated[
        str, typer.Option(help="Interpreter on the device whose packages are checked.")
    ] = "python3",
    timeout: Annotated[
        float, typer.Option(help="Seconds per import check (an emulated CPU needs ~60).")
    ] = 900.0,
    packages: Annotated[
        str, typer.Option(help="The packages to check, comma-separated.")
    ] = ",".join(PACKAGES),
) -> None:
    """Check the CPU and the installed torch / onnxruntime / numpy against known crashes."""
    from wasi_tool.doctor import check_packages, parse_assume, run_doctor

    try:
        versions = parse_assume(assume) if assume is not None else None
        target = None
        if ssh:
            from wasi_tool.bench.ssh import SSHTarget

            target = SSHTarget.parse(ssh, ssh_key, known_hosts, python=remote_python)
        names = tuple(p.strip() for p in packages.split(",") if p.strip())
        check_packages(names)
        to_stdout = json_path is not None and str(json_path) == "-"
        if not to_stdout and versions is None and cpuinfo is None:
            console.print("importing each package in a fresh process...", markup=False)
        report = run_doctor(cpuinfo, versions, target, timeout, names)
        if json_path is not None:
            text = json.dumps(report.to_dict(), indent=2) + "\n"
            if to_stdout:
                sys.stdout.write(text)
            else:
                try:
                    json_path.write_text(text)
                except OSError as exc:
                    raise WasiToolError(f"cannot write {json_path}: {exc.strerror}") from None
    except WasiToolError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    if not (json_path is not None and str(json_path) == "-"):
        render(report)
    if not report.ok:
        raise typer.Exit(1)


def render(report: DoctorReport) -> None:
    from rich.table import Table

    facts = report.facts
    table = Table(title=f"wasi-tool doctor: {report.source}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    cpu = report.cpu
    table.add_row("CPU", f"{cpu.model}{f' ({cpu.board})' if cpu.board else ''}, {cpu.isa()}")
    if cpu.arch == "aarch64":
        feats = cpu.arm_features
        table.add_row("features", " ".join(f"{k}{'+' if v else '-'}" for k, v in feats.items()))
    if facts.get("cpu_count") is not None:
        table.add_row(
            "cores",
            f"{facts['cpu_count']} (online {facts.get('cpus_online') or '?'}, this process may "
            f"use {facts.get('cpu_affinity') or '?'})",
        )
    mem = facts.get("memory") or {}
    if mem:
        table.add_row(
            "memory",
            f"{mem.get('MemAvailable', 0) / 1e9:.2f} GB available / "
            f"{mem.get('MemTotal', 0) / 1e9:.2f} GB; swap {mem.get('SwapFree', 0) / 1e9:.2f} / "
            f"{mem.get('SwapTotal', 0) / 1e9:.2f} GB",
        )
    if facts.get("os") or facts.get("kernel"):
        table.add_row("OS", f"{facts.get('os') or '?'}, kernel {facts.get('kernel') or '?'}")
    if facts.get("python"):
        table.add_row("Python", f"{facts['python']} ({facts.get('python_bits')}-bit)")
    table.add_row(
        f"versions ({report.versions_from})",
        ", ".join(f"{k} {v or 'not installed'}" for k, v in report.versions.items()),
    )
    if facts.get("torch_cpu_allocator"):
        table.add_row("torch's CPU allocator", facts["torch_cpu_allocator"])
    console.print(table)
    for f in report.findings:
        console.print(f"{_MARK[f.level]}: {f.topic}: {f.text}", markup=False)
        if f.fix:
            console.print(f"    fix: {f.fix}", markup=False)
        for link in f.links:
            console.print(f"    see: {link}", markup=False)
    problems = report.problems
    console.print(
        f"{len(problems)} problem{'s' if len(problems) != 1 else ''} found"
        if problems
        else "no known problem found",
        markup=False,
    )


def main(args: list[str] | None = None) -> None:
    """``python -m wasi_tool doctor ARGS``, without loading the rest of the CLI (and torch)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
    app.command()(doctor)
    app(args=sys.argv[2:] if args is None else args, prog_name="wasi-tool doctor")
