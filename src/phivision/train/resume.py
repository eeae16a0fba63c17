"""Resume continues the same run: the config a checkpoint was trained with, and whether it is finished.

Each checkpoint carries `phivision_config.yaml`: the resolved config, the number of processes and a
sha256 of the data files. A resume under a config that computes something else is refused, naming
each key; keys that only change how long, how often or how fast may differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import yaml

from phivision.errors import PhivisionError
from phivision.train.checkpoints import COMPLETE_MARKER
from phivision.train.config import TrainConfig
from phivision.train.methods import compute_dtype

RUN_RECORD = "phivision_config.yaml"
# In output_dir once model/ is in place: the step model/ holds (a failed final save leaves an older one).
MODEL_STEP = "model_step.json"
# Keys a resumed run may change: the length of the run, how often it logs, saves and evaluates,
# and how fast or in how much memory the same numbers are computed.
MAY_CHANGE = ("max_steps", "epochs", "save_steps", "save_total_limit", "logging_steps", "eval_steps",
              "eval_samples", "eval_batch_size", "metric", "max_new_tokens", "dataloader_workers", "report_to",
              "output_dir", "skip_invalid", "skip_too_long", "gradient_checkpointing", "vision_crops_per_chunk",
              "attn", "per_method")


def file_sha256(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_record(config: TrainConfig, world_size: int) -> dict:
    """What a checkpoint was computed with: resolved values (`auto` written out) and the data's content."""
    record = dataclasses.asdict(config)
    record.update(
        learning_rate=config.resolved_learning_rate,
        lora_alpha=config.resolved_lora_alpha,
        gradient_checkpointing=config.resolved_gradient_checkpointing,
        precision=str(compute_dtype(config)).removeprefix("torch."),
        processes=world_size,
        train_data_sha256=file_sha256(config.train_data),
        eval_data_sha256=file_sha256(config.eval_data),
    )
    return record


def record_text(record: dict) -> str:
    return yaml.safe_dump(record, sort_keys=False)


def check_same_run(checkpoint: str | Path, record: dict) -> bool:
    """Refuse a resume that would compute something else; False when the checkpoint has no record."""
    path = Path(checkpoint) / RUN_RECORD
    if not path.is_file():
        return False
    saved = yaml.safe_load(path.read_text()) or {}
    differences = [f"{key} {saved[key]!r} -> {value!r}" for key, value in record.items()
                   if key not in MAY_CHANGE and key in saved and saved[key] != value]
    if differences:
        raise PhivisionError(
            f"--resume {checkpoint}: it was trained with a different config ({'; '.join(differences)}). "
            "Resume with the original values (only max_steps, epochs, save/log/eval settings and dataloader_workers "
            "may change), or start a new run in another output_dir"
        )
    return True


def finished(checkpoint: str | Path, config: TrainConfig) -> bool:
    """True when the checkpoint already reached the end this config asks for (max_steps, else epochs)."""
    state = json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text())
    if config.max_steps > 0:
        return state["global_step"] >= config.max_steps
    return state.get("epoch", 0.0) >= config.epochs - 1e-6


def mark_model_step(output_dir: str | Path, step: int) -> None:
    (Path(output_dir) / MODEL_STEP).write_text(json.dumps({"global_step": step}) + "\n")


def model_is_at(output_dir: str | Path, step: int) -> bool:
    """True when `output_dir/model` holds the weights of `step`, not those of an earlier end of the run."""
    path = Path(output_dir) / MODEL_STEP
    if not (Path(output_dir) / "model").is_dir() or not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("global_step") == step
    except (ValueError, AttributeError):
        return False
