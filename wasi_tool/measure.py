"""Measuring what a training step really costs: bytes saved for backward, live tensors, peak RSS."""

from __future__ import annotations

import functools
import resource
import sys
import weakref
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_ACTIVE: list[SavedBytesMeter] = []


def count_kept(t: torch.Tensor) -> None:
    """Count a tensor kept for backward outside autograd's saved tensors (a recompute region's
    inputs, its recorded compressions) in the active meter, if any."""
    if _ACTIVE:
        _ACTIVE[-1]._pack(t)


class SavedBytesMeter:
    """Counts the bytes autograd saves for backward while active (one forward).

    Each storage is counted once; parameters are left out (they exist anyway). Bytes saved
    while one of the ``targets`` modules is running its forward are also counted apart, and
    per module of ``regions`` (e.g. the blocks) in ``by_region`` ("outside" for the rest). Inside
    a recompute region (nn/recompute.py) autograd's saved tensors are the checkpoint's own and
    are replayed in backward; what the region really keeps (its inputs, recorded WASI/ASI
    compressions) is counted through ``count_kept``.
    """

    def __init__(
        self, model: nn.Module, targets: Iterable[str] = (), regions: Iterable[str] = ()
    ) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.total = 0
        self.targets = 0
        self.by_region: dict[str, int] = {}  # bytes saved inside each of ``regions``
        self._depth = 0
        self._region: list[str] = []
        self._seen: set[int] = set()
        self._handles = []
        for name in targets:
            module = model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(self._enter_target))
            self._handles.append(module.register_forward_hook(self._leave_target))
        for name in regions:
            module = model.get_submodule(name)
            enter = functools.partial(self._enter_region, name)
            self._handles.append(module.register_forward_pre_hook(enter))
            self._handles.append(module.register_forward_hook(self._leave_region))
        self._hooks: Any = None

    def _enter_region(self, name: str, *_: Any) -> None:
        self._region.append(name)

    def _leave_region(self, *_: Any) -> None:
        self._region.pop()

    def _enter_target(self, *_: Any) -> None:
        self._depth += 1

    def _leave_target(self, *_: Any) -> None:
        self._depth -= 1

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.params and ptr not in self._seen:
            self._seen.add(ptr)
            self.total += storage.nbytes()
            if self._depth > 0:
                self.targets += storage.nbytes()
            where = self._region[-1] if self._region else "outside"
            self.by_region[where] = self.by_region.get(where, 0) + storage.nbytes()
        return t

    def __enter__(self) -> SavedBytesMeter:
        self.total = self.targets = 0
        self.by_region = {}
        self._seen.clear()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _ACTIVE.remove(self)
        self._hooks.__exit__(exc_type, exc, tb)
        self._seen.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _status_kib(field: str) -> int | None:
    """A ``Vm*`` field of /proc/self/status in KiB (None where there is no procfs)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's own memory so far.

    Linux: ``VmHWM``, the high-water mark of this address space; an exec starts it afresh.
    (``ru_maxrss`` is not used there: a child's starts from its parent's resident size at fork
    and survives exec, so a small worker launched by a large parent reported the parent's
    size.) Elsewhere ``ru_maxrss`` (macOS reports bytes).
    """
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def file_backed_bytes() -> int | None:
    """Resident pages of this process that are backed by files now (``RssFile`` + ``RssShmem``:
    the code and data of the libraries it mapped, paged in as they are first used). The kernel
    can drop them under pressure and read them back, so they are not memory the run consumes;
    None where there is no procfs."""
    file_kib, shmem_kib = _status_kib("RssFile"), _status_kib("RssShmem")
    if file_kib is None:
        return None
    return (file_kib + (shmem_kib or 0)) * 1024


def rss_bytes() -> int | None:
    """Resident set size of this process now (``VmRSS``), None where there is no procfs."""
    rss = _status_kib("VmRSS")
    return None if rss is None else rss * 1024


def library_floor(model: nn.Module) -> int | None:
    """The library floor: resident size now, with ``model`` loaded, less its weights and
    buffers (what the process holds before training adds anything).

    Weights loaded from a safetensors file are the file's pages (``load_state_dict(assign=True)``
    on safetensors' memory map), resident only once read: they are read here first, so that
    what is subtracted is resident. (Otherwise the first step pages them in above the floor and
    a checkpoint's weights count twice: 0.11 GB of a factored ViT-B/32's 0.14 GB did.)"""
    state = [t for t in model.state_dict().values() if isinstance(t, torch.Tensor)]
    with torch.no_grad():
        for t in state:
            if t.numel() and not t.is_meta:
                t.reshape(-1)[:: max(1, 4096 // t.element_size())].sum()  # one read a page
    rss = rss_bytes()
    weights = sum(t.numel() * t.element_size() for t in state)
    return None if rss is None else rss - weights


def reset_peak_rss() -> bool:
    """Restart the ``VmHWM`` high-water mark at the current resident size (Linux; returns
    whether it could), so a phase's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


class LiveTensorMeter(TorchDispatchMode):
    """High-water mark of the bytes of live tensors created while active (a dispatch mode).

    Every tensor an op returns is tracked until its last Python reference dies; storages are
    counted once however many views share them. Tensors made before the meter started
    (weights, the input batch) are not counted: the figure is what a step allocates on top of
    them (saved activations, gradients, optimiser state made in the step, workspace). Ops
    that run outside Python tensors (inside one fused kernel) are invisible, so the figure is
    a lower bound of the allocator's own peak.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [bytes, live tensors]

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if key == 0 or size == 0:
            return
        entry = self._storages.get(key)
        if entry is None:
            self._storages[key] = [size, 1]
            self.live += size
            self.peak = max(self.peak, self.live)
        else:
            entry[1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
                self._track(t)
        return out


# torch wraps a dispatch mode's __torch_dispatch__ in torch._dynamo.disable, lazily: the first
# call imports all of torch._dynamo, 0.16 GB resident for the rest of a run that compiles
# nothing (the memory plan's probe steps run this meter before training; issue 34). The meter
# is never compiled: it is its own "disabled" version, which torch caches under this name.
_dispatch = getattr(LiveTensorMeter.__torch_dispatch__, "__wrapped__", None)
if _dispatch is not None:
    setattr(_dispatch, "__dynamo_disable", _dispatch)


def pace(speedup: float) -> str:
    """A time ratio (baseline time / this time) in words: "1.66x faster", "1.47x slower" or
    "same" (the one wording rule, wasi_tool/wording.py)."""
    from wasi_tool.wording import ratio

    return ratio(speedup, "time")
