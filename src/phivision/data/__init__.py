"""The jsonl training format, its validator, datasets, collation, sampling and dataset converters."""

from __future__ import annotations

from typing import TYPE_CHECKING

from phivision._lazy import lazy_exports

if TYPE_CHECKING:
    from phivision.data.format import Sample, Turn, parse_sample, JsonlDataset
    from phivision.data.dataset import ConversationDataset, check_dataset
    from phivision.data.collate import Collator
    from phivision.data.validate import validate_file, ValidationReport
    from phivision.data.converters import get_converter, CONVERTERS

# public name -> the module that defines it
_EXPORTS = {
    "Sample": "phivision.data.format",
    "Turn": "phivision.data.format",
    "parse_sample": "phivision.data.format",
    "JsonlDataset": "phivision.data.format",
    "ConversationDataset": "phivision.data.dataset",
    "check_dataset": "phivision.data.dataset",
    "Collator": "phivision.data.collate",
    "validate_file": "phivision.data.validate",
    "ValidationReport": "phivision.data.validate",
    "get_converter": "phivision.data.converters",
    "CONVERTERS": "phivision.data.converters",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
