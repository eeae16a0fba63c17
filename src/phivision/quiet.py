"""Keeping library chatter (load bars, deprecation notes, accelerator guesses) out of phivision's output."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator

# DeepSpeed announces each op it compiles with a bare print(), on every rank.
DEEPSPEED_BUILD_LINE = r"^DeepSpeed \S+ built successfully$"


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def _one_line_warnings(previous):
    """PIL's DecompressionBombWarning prints as two lines (the warning, then a source line): say it in one."""

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__name__ == "DecompressionBombWarning":
            print(f"phivision: warning: {message}", file=file or sys.stderr)
            return
        previous(message, category, filename, lineno, file, line)

    return show


def quiet_libraries() -> None:
    """Library chatter (load bars, deprecation notes) would bury phivision's own messages."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # accelerate picks CPU threads itself when OMP_NUM_THREADS is unset and says so on every rank.
    warnings.filterwarnings("ignore", message="OMP_NUM_THREADS/MKL_NUM_THREADS unset")
    if not getattr(warnings.showwarning, "phivision", False):
        warnings.showwarning = _one_line_warnings(warnings.showwarning)
        warnings.showwarning.phivision = True
    for name in ("DeepSpeed", "bitsandbytes", "accelerate"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)  # also quiets the child loggers (bitsandbytes.backends.cpu.ops, ...)
        logger.addFilter(_errors_only)  # DeepSpeed resets its logger's level when it is imported


class _LineFilter(io.TextIOBase):
    """A text stream that passes every line on except those matching `pattern`."""

    def __init__(self, stream, pattern: str):
        self.stream = stream
        self.pattern = re.compile(pattern)
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not self.pattern.search(line):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and not self.pattern.search(self.pending):
            self.stream.write(self.pending)
        self.pending = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


@contextlib.contextmanager
def stdout_without(pattern: str) -> Iterator[None]:
    """Drop printed lines that no logger controls (DeepSpeed's op-build notes) while the block runs."""
    filtered = _LineFilter(sys.stdout, pattern)
    try:
        with contextlib.redirect_stdout(filtered):
            yield
    finally:
        filtered.flush()
