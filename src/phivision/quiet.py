"""Keeping library chatter (load bars, deprecation notes, accelerator guesses) out of phivision's output."""

from __future__ import annotations

import logging
import os
import warnings


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_libraries() -> None:
    """Library chatter (load bars, deprecation notes) would bury phivision's own messages."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("DeepSpeed", "bitsandbytes", "accelerate"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)  # also quiets the child loggers (bitsandbytes.backends.cpu.ops, ...)
        logger.addFilter(_errors_only)  # DeepSpeed resets its logger's level when it is imported
