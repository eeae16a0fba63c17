"""One training run per output folder: `output_dir/.lock` names the run that holds it.

Two runs writing one folder interleave `metrics.jsonl` and checkpoints; the second one refuses
instead. The lock records host, pid and start time, so a lock left by a killed run on this host
is recognised (its pid is gone) and taken over; on a shared filesystem a lock from another host
cannot be checked from here, so the message says how to remove it.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from phivision.errors import PhivisionError

LOCK_NAME = ".lock"

T = TypeVar("T")


def _started_at(pid: int) -> float | None:
    """When process `pid` started (Linux /proc), or None where that cannot be read."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _holder_alive(holder: dict) -> bool:
    """The holder's pid runs and is the process that took the lock, not a later one given the same pid
    (a restarted container keeps its host name and hands out the same small pids)."""
    pid = int(holder["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    created, started = holder.get("created"), _started_at(pid)
    if isinstance(created, (int, float)) and started is not None:
        return started <= created + 1  # a second of slack for the clocks' granularity
    return True


def _read_holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and {"host", "pid"} <= holder.keys() else None


def _create(path: Path) -> bool:
    """True when this process created the lock file (O_EXCL: exactly one creator wins)."""
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "created": time.time(), "command": " ".join(sys.argv)}
    with os.fdopen(descriptor, "w") as file:
        json.dump(holder, file)
    return True


def acquire(output_dir: str | Path) -> Path:
    """Take the folder's lock, or raise naming the run that holds it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    if _create(path):
        return path
    holder = _read_holder(path)
    if holder is None:
        raise PhivisionError(f"output_dir {output_dir} is locked by {path}, which cannot be read: if no run is "
                             f"using this folder, delete {path}")
    described = f"pid {holder['pid']} on {holder['host']}, started {holder.get('started', '?')}"
    if holder["host"] != socket.gethostname():
        raise PhivisionError(f"output_dir {output_dir} is in use by a run on another machine ({described}): "
                             f"if that run is gone, delete {path}; else choose another output_dir")
    if _holder_alive(holder):
        raise PhivisionError(f"output_dir {output_dir} is in use by another run ({described}): wait for it to "
                             "end, or choose another output_dir")
    print(f"phivision train: taking over the lock of a run that is gone ({described})", file=sys.stderr)
    path.unlink(missing_ok=True)
    if not _create(path):
        raise PhivisionError(f"output_dir {output_dir} was just locked by another run starting at the same time: "
                             "choose another output_dir")
    return path


def release(path: Path) -> None:
    """Remove the lock if it is still this process's own."""
    holder = _read_holder(path)
    if holder is not None and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
        path.unlink(missing_ok=True)


@contextmanager
def output_lock(output_dir: str | Path) -> Iterator[Path]:
    """Held for the body, released on every way out of it (return, error, Ctrl-C)."""
    path = acquire(output_dir)
    try:
        yield path
    finally:
        release(path)


def holds_output_lock(train: Callable[..., T]) -> Callable[..., T]:
    """`train(config, ...)` with `config.output_dir` locked throughout, by rank 0 only.

    Every rank writes into the same folder, so one lock stands for the whole job. When rank 0
    refuses, it exits with the error and torchrun stops the other ranks (waiting in the first
    collective).
    """

    @functools.wraps(train)
    def locked(config, *args, **kwargs) -> T:
        if int(os.environ.get("RANK", "0")) != 0:
            return train(config, *args, **kwargs)
        with output_lock(config.output_dir):
            return train(config, *args, **kwargs)

    return locked
