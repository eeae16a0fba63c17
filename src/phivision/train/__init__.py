"""Training: the config (YAML or dict), methods (full ... qlora), the Trainer, checkpoints, the run folder."""

from __future__ import annotations

from typing import TYPE_CHECKING

from phivision._lazy import lazy_exports

if TYPE_CHECKING:
    from phivision.train.config import TrainConfig, ConfigError, load_config
    from phivision.train.run import run_training, TrainResult
    from phivision.train.methods import load_for_training

# public name -> the module that defines it
_EXPORTS = {
    "TrainConfig": "phivision.train.config",
    "ConfigError": "phivision.train.config",
    "load_config": "phivision.train.config",
    "run_training": "phivision.train.run",
    "TrainResult": "phivision.train.run",
    "load_for_training": "phivision.train.methods",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
