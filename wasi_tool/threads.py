"""How many CPU threads torch's kernels use (``--threads``; the default is torch's own, one per
core) and what they do while idle (``--wait-policy``: OpenMP's OMP_WAIT_POLICY). On a shared
machine fewer threads than cores can be much faster: a digits fine-tune went from 32 s to
17 min when its two threads competed with other jobs for two cores.

Nothing here imports torch at module level: the CLI sets the wait policy before torch loads."""

from __future__ import annotations

from wasi_tool.errors import WasiToolError


def check_threads(threads: int | None) -> None:
    if threads is not None and not 1 <= threads <= 1024:
        raise WasiToolError(f"threads must be between 1 and 1024, got {threads}")


def use_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` (None: leave torch's default), here and, via
    OMP_NUM_THREADS, in the processes this one starts (the training bench's workers); the number
    in use after."""
    import os

    import torch

    check_threads(threads)
    if threads is not None:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return torch.get_num_threads()


# OpenMP's wait policy: what torch's idle threads do between parallel regions. Unset, GNU
# OpenMP (torch's on Linux) spins for a while first; beside other busy processes a spinning
# thread holds a core the others need. PASSIVE makes idle threads sleep at once. It is read
# once, when torch loads its OpenMP runtime, so it must be in the environment before
# ``import torch``: the CLI sets it first thing, and the processes it starts inherit it
# (the training bench's workers get it from wasi_tool.allocator.worker_env).
WAIT_POLICIES = ("auto", "passive", "active")
# "auto": measured by benchmarks/contention.py (BENCHMARKS.md, "contention")
AUTO_WAIT_POLICY = "PASSIVE"
WAIT_POLICY_VAR = "OMP_WAIT_POLICY"


def check_wait_policy(choice: str) -> None:
    if choice not in WAIT_POLICIES:
        raise WasiToolError(
            f"wait policy must be one of {', '.join(WAIT_POLICIES)}, got {choice!r}"
        )


def wait_policy_env(choice: str = "auto") -> dict[str, str]:
    """The OMP_WAIT_POLICY a process should start torch with: ``passive`` or ``active`` as
    given; ``auto``: the user's own OMP_WAIT_POLICY when set, else AUTO_WAIT_POLICY."""
    import os

    check_wait_policy(choice)
    if choice != "auto":
        return {WAIT_POLICY_VAR: choice.upper()}
    return {WAIT_POLICY_VAR: os.environ.get(WAIT_POLICY_VAR) or AUTO_WAIT_POLICY}


def set_wait_policy(choice: str = "auto") -> str:
    """Put the wait policy into this process's environment (for torch, when it has not been
    imported yet, and for every process started from here); the value set."""
    import os

    value = wait_policy_env(choice)[WAIT_POLICY_VAR]
    os.environ[WAIT_POLICY_VAR] = value
    return value


def wait_policy() -> str:
    """The wait policy this process's environment names, for a measurement's record: the
    OMP_WAIT_POLICY value, or "unset" (the OpenMP runtime's default)."""
    import os

    return os.environ.get(WAIT_POLICY_VAR) or "unset"
