"""``wasi-tool doctor``: does this device's CPU run the installed torch / onnxruntime wheels?

The facts come from ``wasi_tool.device`` (run here, or copied to a device over SSH); this module
parses /proc/cpuinfo, checks the versions against ``KNOWN_BAD`` (one table: package, versions,
the CPU features the build needs, how it dies, the issue links, the fix) and turns the package
checks (import + a tiny op in a subprocess) into findings. It imports neither torch nor
onnxruntime: on a Raspberry Pi 4 a bad torch dies at import, and doctor must still answer.

ARM feature names are the kernel's hwcaps as /proc/cpuinfo lists them: ``atomics`` (LSE,
ARMv8.1), ``fphp``/``asimdhp`` (fp16 arithmetic, ARMv8.2), ``asimddp`` (dotprod), ``bf16``,
``i8mm``, ``sve``. A Pi 4 (Cortex-A72) is ARMv8.0 and has none of them; a Pi 5 (Cortex-A76)
has atomics, fp16 and dotprod, not bf16, i8mm or SVE.
"""

from __future__ import annotations

import json
import platform
import re
import shlex
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict, cast

from wasi_tool import allocator, device
from wasi_tool.device import CheckResult, Probe
from wasi_tool.errors import WasiToolError

if TYPE_CHECKING:
    from wasi_tool.bench.ssh import SSHTarget

SCHEMA = "wasi-tool-doctor/1"
ARM_FEATURES = ("atomics", "asimddp", "fphp", "asimdhp", "bf16", "i8mm", "sve")
_FEATURE_WORDS = {
    "atomics": "LSE atomics",
    "fphp": "fp16 arithmetic",
    "asimdhp": "fp16 arithmetic",
    "asimddp": "dotprod",
    "bf16": "bf16",
    "i8mm": "i8mm",
    "sve": "SVE",
}
# Arm Ltd's cores (CPU implementer 0x41) by CPU part
ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd48": "Cortex-X2",
    "0xd49": "Neoverse-N2",
    "0xd4f": "Neoverse-V2",
    "0xd80": "Cortex-A520",
    "0xd81": "Cortex-A720",
}
# The wheel sets that pass the emulated job (.ci/aarch64.sh, docs/raspberry-pi.md)
TORCH_FIX = "pip install 'torch==2.9.1' 'torchvision==0.24.1'"
ORT_FIX = "pip install 'onnxruntime>=1.22'"
ARMV82 = ("atomics", "fphp", "asimdhp", "asimddp")  # what a build for ARMv8.2-A may use


@dataclass(frozen=True)
class KnownBad:
    """Releases ``first`` <= v < ``end`` of ``package`` die on an aarch64 CPU that lacks one of
    ``needs``. ``cuda_build_only``: only PyPI's CUDA build (a ``+cpu`` build is not this)."""

    package: str
    first: tuple[int, ...]
    end: tuple[int, ...] | None
    needs: tuple[str, ...]
    crash: str
    links: tuple[str, ...]
    fix: str
    cuda_build_only: bool = False

    def versions(self) -> str:
        first = ".".join(map(str, self.first))
        if self.end is None:
            return f">= {first}"
        end = ".".join(map(str, self.end))
        if len(self.first) == 3 and self.end == (*self.first[:2], self.first[2] + 1):
            return first
        if len(self.first) == 2 and self.end == (self.first[0], self.first[1] + 1):
            return f"{first}.x"
        return f"{first} to < {end}"


KNOWN_BAD: tuple[KnownBad, ...] = (
    KnownBad(
        "torch", (2, 4, 0), (2, 4, 1), ARMV82,
        "SIGILL at import (libarm_compute built for ARMv8.2-A)",
        ("https://github.com/pytorch/pytorch/issues/132032",), TORCH_FIX,
    ),
    KnownBad(
        "torch", (2, 6, 0), (2, 6, 1), ARMV82,
        "SIGILL in torch.jit.script",
        ("https://github.com/pytorch/pytorch/issues/146792",), TORCH_FIX,
    ),
    KnownBad(
        "torch", (2, 10), (2, 11), ("atomics",),
        "SIGILL at import: its bundled mimalloc uses LSE atomics (libc10.so)",
        (
            "https://github.com/pytorch/pytorch/issues/174344",
            "https://github.com/pytorch/pytorch/issues/176993",
        ),
        TORCH_FIX,
    ),
    KnownBad(
        "torch", (2, 11), None, ("atomics",),
        "PyPI's aarch64 wheels from 2.11 on are CUDA builds with NVPL BLAS (~3 GB of "
        "nvidia/triton wheels): import works, the first matmul dies with SIGILL (ldaddal in "
        "libnvpl_blas_core); measured under qemu -cpu cortex-a72, 2.11.0/2.14.1/2.15.0",
        ("docs/raspberry-pi.md",), TORCH_FIX, cuda_build_only=True,
    ),
    KnownBad(
        "onnxruntime", (1, 21, 0), (1, 21, 1), ("fphp", "asimdhp"),
        "SIGILL at import (an fp16 fmov in a static initialiser)",
        ("https://github.com/microsoft/onnxruntime/issues/23957",), ORT_FIX,
    ),
)  # fmt: skip


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: "2.10.1+cpu" -> (2, 10, 1)."""
    found = re.match(r"^\s*v?(\d+(?:\.\d+)*)", version)
    if not found:
        raise WasiToolError(f"not a version: {version!r}")
    return tuple(int(p) for p in found.group(1).split("."))


def _in_range(version: str, row: KnownBad) -> bool:
    v = release(version)
    pad = max(len(v), len(row.first), len(row.end or ()))
    vv = v + (0,) * (pad - len(v))
    lo = row.first + (0,) * (pad - len(row.first))
    if vv < lo:
        return False
    return row.end is None or vv < row.end + (0,) * (pad - len(row.end))


@dataclass(frozen=True)
class CpuInfo:
    """What /proc/cpuinfo says about a CPU."""

    arch: str  # "aarch64", "x86_64", or what the text does not tell ("unknown")
    model: str
    flags: tuple[str, ...]
    processors: int
    board: str | None = None  # the "Model" line of a Raspberry Pi
    part: str | None = None  # ARM "CPU part", e.g. 0xd08

    def has(self, feature: str) -> bool:
        return feature in self.flags

    def missing(self, features: tuple[str, ...]) -> list[str]:
        return [f for f in features if f not in self.flags]

    @property
    def arm_features(self) -> dict[str, bool]:
        return {f: self.has(f) for f in ARM_FEATURES}

    def isa(self) -> str:
        """A short name of the ISA level, as far as the hwcaps show it."""
        if self.arch != "aarch64":
            return self.arch
        if not self.has("atomics"):
            return "ARMv8.0 (no LSE atomics)"
        if all(self.has(f) for f in ("fphp", "asimdhp", "asimddp")):
            return "ARMv8.2-A or later"
        return "ARMv8.1-A or later"


def parse_cpuinfo(text: str, machine: str | None = None) -> CpuInfo:
    """Parse a /proc/cpuinfo text (ARM or x86); ``machine`` (``uname -m``) when it is known."""
    fields: dict[str, str] = {}
    processors = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor":
            processors += 1
        fields.setdefault(key, value)
    if "features" in fields or "cpu implementer" in fields:
        arch = "aarch64"
    elif "vendor_id" in fields or "flags" in fields:
        arch = "x86_64"
    else:
        arch = machine or "unknown"
    if machine and arch != machine and machine in ("aarch64", "x86_64"):
        arch = machine
    flags = tuple((fields.get("features") or fields.get("flags") or "").split())
    part = fields.get("cpu part")
    if arch == "aarch64":
        implementer = fields.get("cpu implementer", "")
        name = ARM_PARTS.get(part or "") if implementer == "0x41" else None
        model = name or f"ARM CPU (implementer {implementer or '?'}, part {part or '?'})"
    else:
        model = fields.get("model name") or fields.get("cpu model") or arch
    return CpuInfo(
        arch=arch,
        model=model,
        flags=flags,
        processors=processors,
        board=fields.get("model") if arch == "aarch64" else None,
        part=part,
    )


@dataclass(frozen=True)
class Finding:
    level: str  # "ok" | "note" | "problem"
    topic: str
    text: str
    fix: str | None = None
    links: tuple[str, ...] = ()


class Facts(Probe, total=False):
    """What a report keeps of the probe (none of it when the CPU or the versions were given
    instead), and the torch CPU allocator doctor inferred."""

    torch_cpu_allocator: str | None


# the probe's facts a report keeps (the package checks are kept apart, the CPU is parsed)
KEPT_FACTS = (
    "machine", "cpus_online", "cpus_possible", "cpu_count", "cpu_affinity", "memory", "os",
    "kernel", "python", "python_bits", "executable", "allocator_libraries", "ld_preload",
)  # fmt: skip


@dataclass
class DoctorReport:
    source: str  # where the facts come from
    cpu: CpuInfo
    versions: dict[str, str | None]
    versions_from: str  # "installed" | "--assume"
    facts: Facts
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.level == "problem" for f in self.findings)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "problem"]

    def cpu_record(self) -> dict[str, Any]:
        """The CPU as recorded: its parsed fields, the ISA and (aarch64) the ARM features."""
        cpu = asdict(self.cpu)
        cpu["isa"] = self.cpu.isa()
        if self.cpu.arch == "aarch64":
            cpu["arm_features"] = self.cpu.arm_features
        return cpu

    def to_dict(self) -> dict[str, object]:
        cpu = self.cpu_record()
        return {
            "schema": SCHEMA,
            "ok": self.ok,
            "source": self.source,
            "cpu": cpu,
            "versions": self.versions,
            "versions_from": self.versions_from,
            "facts": self.facts,
            "findings": [asdict(f) for f in self.findings],
        }


def parse_assume(text: str) -> dict[str, str]:
    """``torch==2.10.1,onnxruntime==1.21.0`` -> {"torch": "2.10.1", ...}."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, version = item.partition("==")
        name = name.strip().lower()
        if not sep or name not in device.PACKAGES:
            raise WasiToolError(
                f"--assume takes NAME==VERSION items of {', '.join(device.PACKAGES)}, "
                f"comma-separated; got {item!r}"
            )
        if not re.match(r"^\s*\d+(\.\d+)*\S*\s*$", version):
            raise WasiToolError(f"--assume: {version!r} is not a version ({name}==X.Y.Z)")
        out[name] = version.strip()
    if not out:
        raise WasiToolError("--assume is empty")
    return out


def torch_cpu_allocator(machine: str, torch_version: str | None) -> str | None:
    """The allocator torch's CPU tensors come from: mimalloc in aarch64 builds from 2.10 on
    (it keeps freed memory for about 10 ms, pytorch/pytorch#178726), else the process's malloc."""
    if torch_version is None:
        return None
    if machine == "aarch64" and release(torch_version)[:2] >= (2, 10):
        return "mimalloc (bundled in torch)"
    return "the process's malloc"


_STAGES = {
    "import": "at import",
    "matmul": "at the first matmul",
    "conv": "in a conv",
    "autograd": "in a backward step",
    "jit": "in torch.jit.script",
    "nms": "in torchvision.ops.nms",
    "session": "building an inference session",
    "run": "running an inference session",
}


def _cpu_words(cpu: CpuInfo, missing: list[str]) -> str:
    words = sorted({_FEATURE_WORDS.get(f, f) for f in missing})
    if not cpu.has("atomics"):
        return f"ARMv8.0 (no {', no '.join(words)})"
    return f"this CPU (no {', no '.join(words)})"


def _is_cpu_build(version: str, check: CheckResult | None) -> bool:
    if "+cpu" in version:
        return True
    info = (check or {}).get("info") or {}
    return bool(check and check.get("ok") and "cuda" in info and info["cuda"] is None)


def _fix_for(package: str, version: str | None, arch: str) -> str | None:
    """The table's fix for that version, else on aarch64 the tested set (unless it is that)."""
    for row in KNOWN_BAD:
        if version is not None and row.package == package and _in_range(version, row):
            return row.fix
    tested = {"torch": "2.9.1", "torchvision": "0.24.1"}
    if arch != "aarch64" or (version is not None and tested.get(package) == version):
        return None
    return {"torch": TORCH_FIX, "torchvision": TORCH_FIX, "onnxruntime": ORT_FIX}.get(package)


def diagnose(
    probe: Probe,
    source: str,
    cpuinfo_text: str | None = None,
    assume: dict[str, str] | None = None,
) -> DoctorReport:
    """Judge what ``wasi_tool.device.probe`` found (``cpuinfo_text``/``assume`` replace the
    CPU and the versions: then the package checks, which ran on another CPU or other
    versions, are not used)."""
    other_cpu = cpuinfo_text is not None
    cpu = parse_cpuinfo(
        cpuinfo_text if cpuinfo_text is not None else str(probe.get("cpuinfo") or ""),
        None if other_cpu else probe.get("machine"),
    )
    versions: dict[str, str | None] = dict(probe.get("packages") or {})
    if assume:  # only what was named is judged
        versions = {name: assume[name] for name in device.PACKAGES if name in assume}
    checks: dict[str, CheckResult] = (
        {} if (other_cpu or assume) else dict(probe.get("checks") or {})
    )
    kept = {} if other_cpu else {key: probe.get(key) for key in KEPT_FACTS}
    facts = cast(Facts, {"checks": checks, **kept})  # the keys are Probe's (KEPT_FACTS)
    report = DoctorReport(source, cpu, versions, "--assume" if assume else "installed", facts)
    add = report.findings.append

    # the CPU
    if cpu.arch == "aarch64":
        have = " ".join(f for f in ARM_FEATURES if cpu.has(f)) or "none"
        absent = " ".join(f for f in ARM_FEATURES if not cpu.has(f)) or "none"
        board = f" ({cpu.board})" if cpu.board else ""
        add(Finding("ok", "cpu", f"{cpu.model}{board}: {cpu.isa()}; has: {have}; lacks: {absent}"))
    elif cpu.arch == "x86_64":
        add(
            Finding(
                "note",
                "cpu",
                f"{cpu.model}: x86_64, not an ARM device: the Raspberry Pi wheel table does not "
                "apply (use --cpuinfo FILE with a copy of the device's /proc/cpuinfo, or --ssh)",
            )
        )
    else:
        add(Finding("note", "cpu", f"{cpu.model}: {cpu.arch}; no table for this architecture"))
    bits = probe.get("python_bits")
    if not other_cpu and bits == 32:
        add(
            Finding(
                "problem",
                "python",
                "a 32-bit Python: torch publishes no 32-bit ARM wheels",
                "install the 64-bit Raspberry Pi OS (or another arm64 OS)",
            )
        )

    # the versions against the table
    flagged: set[str] = set()
    for row in KNOWN_BAD:
        version = versions.get(row.package)
        if version is None or cpu.arch != "aarch64" or not _in_range(version, row):
            continue
        lack = cpu.missing(row.needs)
        if row.cuda_build_only and _is_cpu_build(version, checks.get(row.package)):
            add(
                Finding(
                    "note",
                    row.package,
                    f"{row.package} {version} is a CPU build: PyPI's CUDA/NVPL build of this "
                    "release dies on ARMv8.0, this one was not tested here",
                )
            )
            continue
        if lack:
            flagged.add(row.package)
            add(
                Finding(
                    "problem",
                    row.package,
                    f"{row.package} {version} crashes on {_cpu_words(cpu, lack)}: {row.crash}",
                    row.fix,
                    row.links,
                )
            )
        elif row.cuda_build_only:
            add(
                Finding(
                    "note",
                    row.package,
                    f"{row.package} {version} from PyPI is a CUDA build for aarch64 (~3 GB of "
                    "nvidia/triton wheels); it runs on this CPU. torch 2.9.1 + torchvision 0.24.1 "
                    "is a CPU build of about 0.7 GB",
                    TORCH_FIX,
                )
            )
    for name in device.PACKAGES:
        version = versions.get(name)
        if name not in versions:
            continue
        if version is None:
            if not assume and name != "torchvision":
                add(
                    Finding(
                        "note", name, f"{name} is not installed", _fix_for(name, None, cpu.arch)
                    )
                )
        elif cpu.arch == "aarch64" and name not in flagged and not checks:
            add(Finding("ok", name, f"{name} {version}: not in the known-bad table for this CPU"))

    # the package checks: import + a tiny op, each in its own process
    for name, check in checks.items():
        version = versions.get(name) or "?"
        where = _STAGES.get(check.get("stage") or "", "")
        if check.get("ok"):
            add(Finding("ok", name, f"{name} {version} imports and runs here"))
        elif check.get("signal"):
            sig = str(check["signal"])
            what = {
                "SIGILL": "SIGILL (illegal instruction)",
                "SIGSEGV": "SIGSEGV (segmentation fault)",
                "SIGBUS": "SIGBUS (bus error)",
            }.get(sig, sig)
            add(
                Finding(
                    "problem",
                    name,
                    f"{name} {version} dies with {what} on this CPU"
                    + (f" ({where})" if where else ""),
                    _fix_for(name, version, cpu.arch),
                )
            )
        elif check.get("timeout"):
            add(
                Finding(
                    "problem",
                    name,
                    f"{name} {version}: the import check did not finish in "
                    f"{check['timeout']:.0f} s",
                )
            )
        else:
            add(
                Finding(
                    "problem",
                    name,
                    f"{name} {version} fails{f' {where}' if where else ''}: "
                    f"{check.get('error') or 'exit ' + str(check.get('returncode'))}",
                    _fix_for(name, version, cpu.arch),
                )
            )

    # the allocator
    torch_alloc = torch_cpu_allocator(cpu.arch, versions.get("torch"))
    facts["torch_cpu_allocator"] = torch_alloc
    if torch_alloc and torch_alloc.startswith("mimalloc"):
        add(
            Finding(
                "note",
                "allocator",
                f"torch {versions['torch']} on aarch64 allocates CPU tensors with its bundled "
                "mimalloc, which keeps freed memory for about 10 ms: resident-memory figures "
                "differ from torch 2.9's, and a jemalloc/tcmalloc preload replaces malloc, "
                "not it",
                links=("https://github.com/pytorch/pytorch/issues/178726",),
            )
        )
    if not other_cpu:
        libs = probe.get("allocator_libraries") or {}
        found = [f"{n} ({p})" for n, p in libs.items() if p]
        add(
            Finding(
                "ok" if found else "note",
                "allocator",
                f"{', '.join(found)} installed: bench --train starts its workers on it "
                "(finetune runs on it when started with it, as scripts/demo.sh does)"
                if found
                else "neither tcmalloc nor jemalloc is installed: training runs on glibc's "
                "malloc, whose freed heap stays resident",
                None if found else "apt install libtcmalloc-minimal4",
            )
        )

    # memory
    mem = probe.get("memory") or {}
    if not other_cpu and mem:
        add(
            Finding(
                "ok",
                "memory",
                f"{mem.get('MemAvailable', 0) / 1e9:.2f} GB available of "
                f"{mem.get('MemTotal', 0) / 1e9:.2f} GB, swap {mem.get('SwapFree', 0) / 1e9:.2f} "
                f"GB free of {mem.get('SwapTotal', 0) / 1e9:.2f} GB; the largest batch is not "
                "estimated here (the planner measures a real step of your model): use finetune "
                "--memory-budget",
            )
        )
    return report


def _libraries() -> dict[str, list[str]]:
    # allocator.py's own search list, so doctor looks where training does
    return {
        name: [str(Path(d) / lib) for d in allocator._DIRS for lib in libs]
        for name, libs in allocator._LIBRARIES.items()
    }


def check_packages(packages: tuple[str, ...]) -> None:
    unknown = [p for p in packages if p not in device.PACKAGES]
    if unknown or not packages:
        raise WasiToolError(
            f"packages must be some of {', '.join(device.PACKAGES)}, got {', '.join(unknown)}"
        )


def run_doctor(
    cpuinfo: Path | None = None,
    assume: dict[str, str] | None = None,
    ssh: SSHTarget | None = None,
    timeout: float = 900.0,
    packages: tuple[str, ...] = device.PACKAGES,
    checks: bool = True,
) -> DoctorReport:
    """Gather the facts (here, or on ``ssh``'s device) and judge them.

    Args:
        cpuinfo: judge this /proc/cpuinfo text's CPU instead (no package checks).
        assume: package versions to judge instead of the installed ones (no package checks).
        ssh: run ``wasi_tool/device.py`` on that device with its ``python3``.
        timeout: seconds per package check.
        packages: the packages to look at (default: torch, torchvision, onnxruntime, numpy).
        checks: import each package in a subprocess (off with ``cpuinfo`` or ``assume``).
    """
    check_packages(packages)
    text = None
    if cpuinfo is not None:
        try:
            text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise WasiToolError(f"cannot read {cpuinfo}: {exc.strerror}") from None
        if not parse_cpuinfo(text).flags:
            raise WasiToolError(f"{cpuinfo} does not look like a /proc/cpuinfo (no flags)")
    checks = checks and cpuinfo is None and assume is None
    if ssh is None:
        facts = device.probe(checks, timeout, _libraries(), packages)
        source = f"this machine ({platform.node()})"
    else:
        facts = _remote_probe(ssh, checks, timeout, packages)
        source = f"{ssh.destination} over SSH"
    if cpuinfo is not None:
        source = f"{cpuinfo} (a copy of a device's /proc/cpuinfo)"
    return diagnose(facts, source, text, assume)


def _remote_probe(ssh: SSHTarget, checks: bool, timeout: float, packages: tuple[str, ...]) -> Probe:
    made = ssh.ssh(["mktemp", "-d"], "mktemp")
    remote_dir = made.stdout.strip()
    if made.returncode != 0 or not remote_dir.startswith("/"):
        raise WasiToolError(f"cannot make a temporary directory on {ssh.destination}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "wasi_device_probe.py"
            script.write_bytes(Path(device.__file__).read_bytes())
            ssh.copy([script], remote_dir)
        argv = [ssh.python, f"{remote_dir}/wasi_device_probe.py", "--timeout", str(timeout)]
        argv += ["--packages", ",".join(packages)]
        if not checks:
            argv.append("--no-checks")
        for name, paths in _libraries().items():
            argv += [item for p in paths for item in ("--lib", f"{name}={p}")]
        proc = ssh.ssh(argv, "doctor")
    finally:
        ssh.ssh(["rm", "-rf", "--", remote_dir], "clean-up")
    try:
        facts = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise WasiToolError(
            f"doctor failed on {ssh.destination} ({shlex.quote(ssh.python)}): "
            f"{lines[-1] if lines else 'no output'}"
        ) from None
    if not isinstance(facts, dict) or facts.get("schema") != device.SCHEMA:
        raise WasiToolError(f"unexpected doctor output from {ssh.destination}")
    return cast(Probe, facts)  # the device's own probe, by its schema


class DeviceRecord(TypedDict):
    """What a benchmark record says about its machine (``device_record``)."""

    source: str
    cpu: dict[str, Any]
    versions: dict[str, str | None]
    torch_cpu_allocator: str | None
    doctor_ok: bool
    findings: list[str]
    is_profile_device: NotRequired[bool]  # bench with --device: whether this is one


def device_record(ssh: SSHTarget | None = None) -> DeviceRecord:
    """What a benchmark record says about the machine it ran on (here, or ``ssh``'s device):
    the CPU (model, part, flags, ISA), the package versions and doctor's findings (no import
    checks: the bench itself ran them)."""
    report = run_doctor(ssh=ssh, checks=False)
    return {
        "source": report.source,
        "cpu": report.cpu_record(),
        "versions": report.versions,
        "torch_cpu_allocator": report.facts.get("torch_cpu_allocator"),
        "doctor_ok": report.ok,
        "findings": [f"{f.level}: {f.topic}: {f.text}" for f in report.findings],
    }
