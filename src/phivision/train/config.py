"""The training configuration: one flat YAML, every key overridable with `--set key=value`.

Validated up front: an unknown key, a wrong type or an impossible combination is one
`ConfigError` naming the key and the fix, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from phivision.errors import PhivisionError

METHODS = ("full", "freeze_vision", "projector_only", "lora", "qlora")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ATTENTIONS = ("sdpa", "eager", "flash_attention_2")

# Learning rate when `learning_rate: auto`: adapters take a larger step than full weights.
DEFAULT_LEARNING_RATES = {"full": 4e-5, "freeze_vision": 4e-5, "projector_only": 1e-4, "lora": 2e-4, "qlora": 2e-4}
# Methods that recompute activations unless told otherwise: QLoRA is chosen to save memory, and
# its quantised weights leave activations as the largest part of it.
CHECKPOINTING_BY_DEFAULT = ("qlora",)
# More loader processes than this rarely help one training process and cost memory each.
MAX_DEFAULT_WORKERS = 4
PATH_KEYS = ("model", "train_data", "eval_data", "train_image_root", "eval_image_root", "output_dir")


class ConfigError(PhivisionError):
    """A configuration problem: the CLI exits with status 2."""


@dataclass
class TrainConfig:
    """Every training setting (README "Configuration keys"); build it with `load_config` to have it checked."""

    model: str
    train_data: str
    output_dir: str
    train_image_root: str | None = None
    eval_data: str | None = None
    eval_image_root: str | None = None
    method: str = "lora"
    precision: str = "auto"
    attn: str = "sdpa"
    num_crops: int = 4
    max_length: int = 8192
    train_on: str = "all"
    skip_invalid: bool = False
    skip_too_long: bool = False
    global_batch_size: int = 64
    per_device_batch_size: int = 1
    packing: bool = True
    max_tokens_per_batch: int | None = None
    group_by_length: bool = False
    gradient_checkpointing: bool | None = None
    vision_crops_per_chunk: int | None = None
    lora_rank: int = 64
    lora_alpha: float | None = None
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None
    learning_rate: float | str = "auto"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-7
    max_grad_norm: float = 1.0
    lr_scheduler: str = "linear"
    warmup_steps: int = 50
    epochs: float = 1.0
    max_steps: int = -1
    save_steps: int = 500
    save_total_limit: int | None = 2
    eval_steps: int | None = None
    eval_samples: int | None = 200
    eval_batch_size: int = 8
    metric: str = "auto"
    max_new_tokens: int = 64
    logging_steps: int = 10
    seed: int = 42
    deepspeed: str | None = None
    dataloader_workers: int | None = None
    ddp_timeout: int = 1800
    report_to: list[str] = field(default_factory=list)
    per_method: dict | None = None

    @property
    def resolved_learning_rate(self) -> float:
        if self.learning_rate == "auto":
            return DEFAULT_LEARNING_RATES[self.method]
        return float(self.learning_rate)

    @property
    def resolved_gradient_checkpointing(self) -> bool:
        if self.gradient_checkpointing is None:
            return self.method in CHECKPOINTING_BY_DEFAULT
        return self.gradient_checkpointing

    @property
    def resolved_dataloader_workers(self) -> int:
        """`null`: one core per process stays for the training step, the rest decode images (at most 4)."""
        if self.dataloader_workers is not None:
            return self.dataloader_workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return min(MAX_DEFAULT_WORKERS, max(0, cores // processes_here - 1))

    @property
    def resolved_lora_alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    def gradient_accumulation(self, world_size: int) -> int:
        per_step = self.per_device_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} is not a multiple of per_device_batch_size x "
                f"processes = {self.per_device_batch_size} x {world_size}: change one of them"
            )
        return self.global_batch_size // per_step

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
REQUIRED = [name for name, f in FIELDS.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
TYPE_HINTS = typing.get_type_hints(TrainConfig)


def _allowed_types(hint) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(t for arg in typing.get_args(hint) for t in _allowed_types(arg))
    return (typing.get_origin(hint) or hint,)


NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_type(key: str, value):
    allowed = _allowed_types(TYPE_HINTS[key])
    if float in allowed and isinstance(value, str) and NUMBER.fullmatch(value):
        value = float(value)  # YAML reads 1e-5 (no dot) as a string
    if value is None and type(None) in allowed:
        return value
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value) if int not in allowed else value
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(f"{key} must be {_type_names(allowed)}, got {value!r}")
    if not isinstance(value, allowed):
        raise ConfigError(f"{key} must be {_type_names(allowed)}, got {value!r} ({type(value).__name__})")
    if list in allowed and isinstance(value, list) and not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{key} must be a list of strings, got {value!r}")
    return value


def _type_names(allowed: tuple) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
             type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in allowed)


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: write it as key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _apply_per_method(values: dict, command_line: dict) -> dict:
    """`per_method: {lora: {learning_rate: 2e-4}}` applies to the chosen method; --set still wins."""
    per_method = values.get("per_method")
    if per_method is None:
        return values
    if not isinstance(per_method, dict) or not all(isinstance(v, dict) for v in per_method.values()):
        raise ConfigError("per_method must map method names to mappings of keys, e.g. {lora: {learning_rate: 2e-4}}")
    unknown_methods = [name for name in per_method if name not in METHODS]
    if unknown_methods:
        raise ConfigError(f"per_method has unknown method {unknown_methods[0]!r}: use {', '.join(METHODS)}")
    chosen = per_method.get(values.get("method", FIELDS["method"].default), {})
    return {**values, **{k: v for k, v in chosen.items() if k not in command_line}}


def load_config(path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None) -> TrainConfig:
    """Read YAML (or start from `base`), apply `key=value` overrides, validate everything."""
    values: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of keys to values")
        values.update(loaded)
    command_line = dict(_parse_override(override) for override in overrides or [])
    values.update(command_line)
    values = _apply_per_method(values, command_line)
    unknown = [key for key in values if key not in FIELDS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")
    missing = [key for key in REQUIRED if values.get(key) in (None, "")]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(missing)}")
    checked = {key: _check_type(key, value) for key, value in values.items()}
    for key in PATH_KEYS:
        if checked.get(key):  # the saved config.yaml (read by export, resume) then works from any directory
            checked[key] = str(Path(checked[key]).expanduser().absolute())
    config = TrainConfig(**checked)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Combinations that cannot work, caught before anything is loaded."""
    choices = {"method": METHODS, "precision": PRECISIONS, "attn": ATTENTIONS, "train_on": ("all", "last"),
               "metric": ("auto", "accuracy", "anls"), "lr_scheduler": ("linear", "cosine", "constant_with_warmup")}
    for key, allowed in choices.items():
        if getattr(config, key) not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {getattr(config, key)!r}")
    if isinstance(config.learning_rate, str) and config.learning_rate != "auto":
        raise ConfigError(f"learning_rate must be a number or 'auto', got {config.learning_rate!r}")
    positive = ["num_crops", "global_batch_size", "per_device_batch_size", "lora_rank", "save_steps",
                "logging_steps", "max_length", "eval_batch_size", "max_new_tokens", "ddp_timeout"]
    for key in positive:
        if getattr(config, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(config, key)}")
    for key in ("eval_steps", "eval_samples", "save_total_limit", "max_tokens_per_batch", "vision_crops_per_chunk"):
        if getattr(config, key) is not None and getattr(config, key) < 1:
            raise ConfigError(f"{key} must be at least 1 (or null), got {getattr(config, key)}")
    for key in ("warmup_steps", "dataloader_workers"):
        if getattr(config, key) is not None and getattr(config, key) < 0:
            raise ConfigError(f"{key} must be 0 or more, got {getattr(config, key)}")
    if config.learning_rate != "auto" and float(config.learning_rate) <= 0:
        raise ConfigError(f"learning_rate must be above 0, got {config.learning_rate}")
    if config.global_batch_size % config.per_device_batch_size:
        raise ConfigError(
            f"global_batch_size={config.global_batch_size} is not a multiple of "
            f"per_device_batch_size={config.per_device_batch_size}"
        )
    if config.epochs <= 0 and config.max_steps <= 0:
        raise ConfigError("set epochs > 0 or max_steps > 0")
    if not 0 <= config.lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {config.lora_dropout}")
    if config.precision == "fp16" and config.method == "qlora":
        raise ConfigError("qlora computes in bf16 or fp32; use precision: bf16 (or fp32 on a CPU)")
    if config.deepspeed and config.method == "qlora":
        raise ConfigError("qlora does not combine with DeepSpeed ZeRO: drop `deepspeed` (QLoRA fits one GPU)")
    if config.max_tokens_per_batch is not None and not config.packing:
        raise ConfigError("max_tokens_per_batch packs samples into one row: it needs packing: true")
    if config.max_tokens_per_batch is not None and config.max_tokens_per_batch < config.max_length:
        raise ConfigError(
            f"max_tokens_per_batch={config.max_tokens_per_batch} is below max_length={config.max_length}: "
            "a sample of max_length tokens must fit in one batch"
        )
    if config.eval_steps is not None and not config.eval_data:
        raise ConfigError("eval_steps is set but eval_data is not: give eval_data or drop eval_steps")


LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def optimiser_steps(config: TrainConfig, samples: int, world_size: int) -> int:
    """Optimiser steps the Trainer will make (an upper bound under a token budget, which packs more per batch)."""
    if config.max_steps > 0:
        return config.max_steps
    micro_batches = math.ceil(math.ceil(samples / config.per_device_batch_size) / world_size)
    per_epoch = max(math.ceil(micro_batches / config.gradient_accumulation(world_size)), 1)
    return math.ceil(config.epochs * per_epoch)


def check_schedule(config: TrainConfig, samples: int, world_size: int) -> list[str]:
    """Warnings (each naming its fix) for a config that trains less than it seems to, once the data size is known.

    A run whose every step is taken at learning rate 0 (warm-up starts at 0) would learn nothing
    and still report the configured rate: that is an error.
    """
    steps = optimiser_steps(config, samples, world_size)
    if config.warmup_steps > 0 and steps == 1:
        reason = ("max_steps=1" if config.max_steps > 0 else
                  f"{samples} samples, global_batch_size={config.global_batch_size}, epochs={config.epochs:g}")
        raise ConfigError(
            f"this run makes 1 optimiser step ({reason}) and warm-up takes it at learning rate 0 "
            f"(warmup_steps={config.warmup_steps}), so nothing would be learned: set warmup_steps: 0, or make more "
            "steps (lower global_batch_size, raise epochs or max_steps)"
        )
    warnings = []
    if config.warmup_steps >= steps:
        warnings.append(f"warmup_steps={config.warmup_steps} is not shorter than the run ({steps} optimiser steps): "
                        f"the learning rate never reaches {config.resolved_learning_rate:g}; lower warmup_steps "
                        "(about a tenth of the steps is usual)")
    if samples < config.global_batch_size:
        warnings.append(f"the {samples} training samples are fewer than one global batch "
                        f"(global_batch_size={config.global_batch_size}): each epoch is a single optimiser step; "
                        "lower global_batch_size")
    if config.eval_data and not config.eval_steps:
        warnings.append("eval_data is set but eval_steps is not, so it is never evaluated: set eval_steps")
    if config.method not in ("lora", "qlora"):
        set_keys = [key for key in LORA_KEYS if getattr(config, key) != FIELDS[key].default]
        if set_keys:
            verb = "applies" if len(set_keys) == 1 else "apply"
            warnings.append(f"{', '.join(set_keys)} only {verb} to method lora or qlora, not {config.method}: "
                            "drop them or change method")
    return warnings
