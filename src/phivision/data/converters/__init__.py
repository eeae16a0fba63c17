"""Public datasets to the training jsonl format; a converter's module is imported only when it runs."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# command-line name -> (module under phivision.data.converters, function)
CONVERTERS = {
    "ucf101": ("ucf101", "convert_ucf101"),
    "docvqa": ("docvqa", "convert_docvqa"),
    "hateful-memes": ("hateful_memes", "convert_hateful_memes"),
    "nlvr2": ("nlvr2", "convert_nlvr2"),
}


def get_converter(name: str) -> Callable[..., dict[str, Any]]:
    """The `convert_*` function behind a command-line name."""
    module_name, function_name = CONVERTERS[name]
    return getattr(importlib.import_module(f"phivision.data.converters.{module_name}"), function_name)
