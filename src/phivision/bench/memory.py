"""Peak memory: the bytes held by tensors (what a method needs) and the process's RSS high-water mark.

On a GPU, tensor memory is CUDA's peak allocated. A CPU has no such counter, so `TensorPeak`
follows every CPU allocation and free with the PyTorch profiler's memory events; RSS alone would
also count the interpreter and libraries (about 0.6 GB) and what glibc keeps after a free.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    """A `VmRSS` / `VmHWM` line of /proc/self/status in KiB (None off Linux)."""
    if not STATUS.is_file():
        return None
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def resident_memory() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss()


def reset_peak_rss() -> None:
    """Start a new high-water mark, so one process can measure several data paths one after another.

    On Linux, writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS; elsewhere the
    peak stays the process's lifetime peak.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and tied weights count once)."""
    sizes = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        sizes[storage.data_ptr()] = storage.nbytes()
    return sum(sizes.values())


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and the 4-bit quantisation constants that bitsandbytes keeps beside its weights."""
    tensors = [*model.parameters(), *model.buffers()]
    states = [p.quant_state for p in model.parameters() if getattr(p, "quant_state", None) is not None]
    while states:
        state = states.pop()
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif hasattr(value, "absmax"):  # the nested state of double quantisation
                states.append(value)
    return tensors


class TensorPeak:
    """Peak bytes held by tensors while the block runs, counting `resident` bytes alive at its start."""

    def __init__(self, device: torch.device, resident: int):
        self.device, self.resident, self.bytes = device, resident, 0
        self._profiler = None

    def __enter__(self) -> TensorPeak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._profiler.__exit__(*exc_info)
        changes = sorted((event.start_ns(), event.nbytes()) for event in self._profiler.profiler.kineto_results.events()
                         if event.nbytes() and event.device_type() == torch.autograd.DeviceType.CPU)
        live = highest = 0
        for _, change in changes:
            live += change
            highest = max(highest, live)
        self.bytes = self.resident + highest
