"""Peak memory of this process: the RSS high-water mark on a CPU, peak allocated bytes on a GPU."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

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
    return kib * 1024 if kib is not None else peak_memory(torch.device("cpu"))


def reset_peak_memory(device: torch.device) -> None:
    """Start a new high-water mark, so one process can measure several data paths one after another.

    On Linux, writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS; elsewhere the
    CPU peak stays the process's lifetime peak.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
