"""Evaluation: metrics, batched generation, dataset evaluation, LoRA export.

The `generate` function is `phivision.generate`: in this package the name is taken by its module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from phivision._lazy import lazy_exports

if TYPE_CHECKING:
    from phivision.evaluate.generate import load_for_inference, inference_processor
    from phivision.evaluate.evaluation import evaluate_dataset
    from phivision.evaluate.export import export_run
    from phivision.evaluate.metrics import anls, mean_anls, exact_match, accuracy

# public name -> the module that defines it
_EXPORTS = {
    "load_for_inference": "phivision.evaluate.generate",
    "inference_processor": "phivision.evaluate.generate",
    "evaluate_dataset": "phivision.evaluate.evaluation",
    "export_run": "phivision.evaluate.export",
    "anls": "phivision.evaluate.metrics",
    "mean_anls": "phivision.evaluate.metrics",
    "exact_match": "phivision.evaluate.metrics",
    "accuracy": "phivision.evaluate.metrics",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
