"""Device profiles: how onnxruntime is configured for a target device, and what it is."""

from __future__ import annotations

import os
from dataclasses import dataclass

from wasi_tool.errors import WasiToolError


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    threads: int | None  # None: every core of the machine that runs it
    execution_mode: str = "sequential"
    graph_opt: str = "all"
    cpu_part: str | None = None  # the ARM "CPU part" in the device's /proc/cpuinfo

    def is_this(self, part: str | None) -> bool:
        """Whether a CPU of that part is this profile's device (``host`` is every machine)."""
        return self.threads is None or (self.cpu_part is not None and part == self.cpu_part)

    def resolved_threads(self) -> int:
        return self.threads or (os.cpu_count() or 1)


PROFILES: dict[str, DeviceProfile] = {}


def register(profile: DeviceProfile) -> DeviceProfile:
    if profile.name in PROFILES:
        raise ValueError(f"profile {profile.name!r} is already registered")
    PROFILES[profile.name] = profile
    return profile


register(
    DeviceProfile(
        "pi5", "Raspberry Pi 5: 4x Cortex-A76 @ 2.4 GHz, 4-8 GB LPDDR4X", 4, cpu_part="0xd0b"
    )
)
register(
    DeviceProfile(
        "pi4", "Raspberry Pi 4: 4x Cortex-A72 @ 1.5-1.8 GHz, 1-8 GB LPDDR4", 4, cpu_part="0xd08"
    )
)
register(
    DeviceProfile(
        "jetson-orin-cpu",
        "NVIDIA Jetson Orin Nano, CPU only: 6x Cortex-A78AE @ 1.5 GHz",
        6,
        cpu_part="0xd42",
    )
)
register(DeviceProfile("host", "this machine: all of its cores", None))


def get_profile(name: str) -> DeviceProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise WasiToolError(
            f"unknown device profile {name!r}; choose from {', '.join(PROFILES)}"
        ) from None
