"""Running the latency runner or the training bench on a device over SSH (OpenSSH client,
host-key checking on)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wasi_tool.errors import WasiToolError

_TARGET = re.compile(
    r"^(?:(?P<user>[^@\s:]+)@)?(?P<host>[^@\s:]+|\[[0-9a-fA-F:]+\])(?::(?P<port>\d+))?$"
)


@dataclass(frozen=True)
class SSHTarget:
    """``user@host[:port]`` plus how to authenticate; host keys are always checked."""

    host: str
    user: str | None = None
    port: int | None = None
    key: Path | None = None
    known_hosts: Path | None = None
    timeout: float = 600.0
    python: str = "python3"  # the device's interpreter with onnxruntime (a venv's, say)

    @classmethod
    def parse(
        cls,
        text: str,
        key: Path | None = None,
        known_hosts: Path | None = None,
        timeout: float = 600.0,
        python: str = "python3",
    ) -> SSHTarget:
        found = _TARGET.match(text.strip())
        if not found or found.group("host").startswith("-"):
            raise WasiToolError(f"--ssh takes user@host[:port], got {text!r}")
        port = int(found.group("port")) if found.group("port") else None
        if port is not None and not 0 < port < 65536:
            raise WasiToolError(f"ssh port must be 1-65535, got {port}")
        return cls(
            found.group("host").strip("[]"),
            found.group("user"),
            port,
            key,
            known_hosts,
            timeout,
            python,  # the device's interpreter (it was dropped: --remote-python did nothing)
        )

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def _options(self) -> list[str]:
        opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=15"]
        if self.key is not None:
            opts += ["-i", str(self.key), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts is not None:
            opts += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        return opts

    def _run(self, argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=self.timeout, check=False
            )
        except FileNotFoundError:
            raise WasiToolError(f"{argv[0]} is not installed (needed for --ssh)") from None
        except subprocess.TimeoutExpired:
            raise WasiToolError(
                f"{what} on {self.destination} timed out after {self.timeout:.0f} s"
            ) from None
        if proc.returncode == 255 or (proc.returncode != 0 and argv[0] == "scp"):
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise WasiToolError(f"ssh to {self.destination} failed ({what}): {last}")
        return proc

    def ssh(self, remote_argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
        """Run a command on the device; every argument is shell-quoted for the remote shell."""
        port = ["-p", str(self.port)] if self.port else []
        command = " ".join(shlex.quote(a) for a in remote_argv)
        return self._run(["ssh", *self._options(), *port, "--", self.destination, command], what)

    def copy(self, files: list[Path], remote_dir: str) -> None:
        port = ["-P", str(self.port)] if self.port else []
        target = f"{self.destination}:{shlex.quote(remote_dir)}/"
        self._run(["scp", "-q", *self._options(), *port, "--", *map(str, files), target], "copy")


# Run on the device by its python (its own wasi-tool): the training bench, printed as JSON.
_REMOTE_TRAIN = (
    "import json, sys\n"
    "from wasi_tool.bench.train import TrainBenchConfig, run_train_bench\n"
    "config = TrainBenchConfig.from_dict(json.loads(sys.argv[1]))\n"
    "print(json.dumps(run_train_bench(config, sys.argv[2] or None).to_dict()))\n"
)


def run_remote_train_bench(
    target: SSHTarget, config: dict[str, Any], vs: str | None
) -> dict[str, Any]:
    """``bench --train`` on the device: the checkpoint or artifact (``config["checkpoint"]``)
    is copied to a temporary directory there, the device's wasi-tool (``target.python``) runs
    the training bench with the same settings, and the directory is removed. Returns the
    result as ``TrainBenchResult.to_dict`` gives it."""
    made = target.ssh(["mktemp", "-d"], "mktemp")
    remote_dir = made.stdout.strip()
    if made.returncode != 0 or not remote_dir.startswith("/"):
        raise WasiToolError(f"cannot make a temporary directory on {target.destination}")
    try:
        settings = dict(config)
        if settings.get("checkpoint"):
            src = Path(settings["checkpoint"])
            if src.is_dir():  # an artifact: its files, flat; fixed remote names otherwise
                files = sorted(p for p in src.iterdir() if p.is_file() and not p.is_symlink())
                if not files:
                    raise WasiToolError(f"{src} holds no files to copy")
                remote = f"{remote_dir}/artifact"
                target.ssh(["mkdir", "--", remote], "mkdir")
                target.copy(files, remote)
            elif src.is_file():
                suffix = "".join(s for s in src.suffixes if re.fullmatch(r"\.[A-Za-z0-9]+", s))
                remote = f"{remote_dir}/checkpoint{suffix}"
                with tempfile.TemporaryDirectory() as tmp:
                    staged = Path(tmp) / f"checkpoint{suffix}"
                    shutil.copyfile(src, staged)
                    target.copy([staged], remote_dir)
            else:
                raise WasiToolError(f"no such checkpoint or artifact: {src}")
            settings["checkpoint"] = remote
        proc = target.ssh(
            [target.python, "-c", _REMOTE_TRAIN, json.dumps(settings), vs or ""],
            "training bench",
        )
    finally:
        target.ssh(["rm", "-rf", "--", remote_dir], "clean-up")
    try:
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else "no output"
        if "No module named" in last and "wasi_tool" in last:
            last = f"wasi-tool is not installed for {target.python} there"
        raise WasiToolError(
            f"the training bench failed on {target.destination}: "
            f"{last.removeprefix('wasi_tool.errors.WasiToolError: ')}"
        ) from None
    return result
