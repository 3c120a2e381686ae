"""Running the latency runner on a device over SSH (OpenSSH client, host-key checking on)."""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

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
