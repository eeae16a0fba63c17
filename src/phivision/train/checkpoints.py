"""Checkpoints that are either complete or absent.

Every checkpoint is written into a staging folder and renamed into place once all processes
have finished writing, so a kill during a save never leaves a `checkpoint-N` that looks whole.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from phivision.errors import PhivisionError
from phivision.train.report import read_metrics

STAGING = ".staging"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "trainer_state.json"
REPLACED = ".replaced"  # an older copy of a checkpoint being replaced, inside the staging folder


def staging_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / STAGING


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders in step order (a folder is only ever complete, but check anyway)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT.match(path.name)
        if match and path.is_dir() and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def missing_parts(checkpoint: str | Path, world_size: int) -> list[str]:
    """The files a resume reads that this checkpoint lacks (the Trainer would skip some silently)."""
    checkpoint = Path(checkpoint)
    missing = [name for name in (COMPLETE_MARKER, "scheduler.pt") if not (checkpoint / name).is_file()]
    latest = checkpoint / "latest"
    if latest.is_file() or any(checkpoint.glob("global_step*")):  # DeepSpeed keeps weights and optimizer here
        tag = latest.read_text().strip() if latest.is_file() else None
        states = list((checkpoint / tag).glob("*optim_states.pt")) if tag else []
        if tag is None:
            missing.append("latest")
        elif not list((checkpoint / tag).glob("*model_states.pt")) or len(states) < world_size:
            missing.append(f"{tag}/ (DeepSpeed model or optimizer states)")
    else:
        if not (checkpoint / "optimizer.pt").is_file():
            missing.append("optimizer.pt")
        weights = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
        if not any((checkpoint / name).is_file() for name in weights):
            missing.append("model.safetensors (or adapter_model.safetensors)")
    rng = ["rng_state.pth"] if world_size == 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]
    return missing + [name for name in rng if not (checkpoint / name).is_file()]


def resolve_resume(resume: str | None, output_dir: str | Path, world_size: int = 1) -> tuple[str | None, list[str]]:
    """The checkpoint to continue from, and what was passed over on the way.

    `auto` -> the latest checkpoint with every part (None for a fresh start); an explicit path must
    have every part.
    """
    if resume in (None, "", "none"):
        return None, []
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise PhivisionError(f"--resume {resume}: no such checkpoint folder")
        missing = missing_parts(path, world_size)
        if missing:
            raise PhivisionError(f"--resume {resume}: the checkpoint is incomplete, {', '.join(missing)} missing: "
                                 "resume from an earlier checkpoint")
        return str(path), []
    passed_over = []
    for path in reversed(complete_checkpoints(output_dir)):
        missing = missing_parts(path, world_size)
        if not missing:
            return str(path), passed_over
        passed_over.append(f"{path.name} is incomplete ({', '.join(missing)} missing)")
    if passed_over:
        raise PhivisionError(f"--resume auto: no complete checkpoint in {output_dir}: {'; '.join(passed_over)}")
    return None, []


def check_fresh_output(output_dir: str | Path) -> None:
    """A new run never writes over an earlier one: it resumes it or goes elsewhere."""
    output_dir = Path(output_dir)
    earlier = complete_checkpoints(output_dir)
    if earlier:
        raise PhivisionError(
            f"output_dir {output_dir} already holds a run ({earlier[-1].name}): continue it with --resume auto, "
            "or choose another output_dir"
        )
    if (output_dir / "model").exists():
        raise PhivisionError(f"output_dir {output_dir} holds a finished run (model/) with no checkpoint left to "
                             "resume from: choose another output_dir")


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint: those steps are trained again."""
    if not path.is_file():
        return
    kept = [record for record in read_metrics(path) if record["step"] <= step]
    path.write_text("".join(json.dumps(record) + "\n" for record in kept))


def checkpoint_step(checkpoint: str | Path) -> int:
    """The step a checkpoint was saved at, from its state (the folder may have been renamed)."""
    return int(json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text())["global_step"])


def clear_staging(output_dir: str | Path) -> None:
    """What a killed save left behind is incomplete by construction: remove it.

    A checkpoint set aside by `publish` whose replacement never arrived is put back first.
    """
    staging = staging_dir(output_dir)
    for aside in staging.glob(f"*{REPLACED}"):
        original = Path(output_dir) / aside.name.removesuffix(REPLACED)
        if not original.exists():
            aside.rename(original)
    shutil.rmtree(staging, ignore_errors=True)


def publish(staged: Path, final: Path) -> None:
    """The checkpoint appears whole or not at all; one it replaces stays until the new one is in place."""
    if not final.exists():
        staged.rename(final)
        return
    aside = staged.parent / f"{final.name}{REPLACED}"
    shutil.rmtree(aside, ignore_errors=True)
    final.rename(aside)
    staged.rename(final)
    shutil.rmtree(aside)


# How torch (PytorchStreamWriter) and safetensors (IoError) report a failed write: not as OSError.
WRITE_FAILURES = {"No space left": "No space left on device", "StorageFull": "No space left on device",
                  "os error 28": "No space left on device", "Read-only file system": "Read-only file system",
                  "ReadOnlyFilesystem": "Read-only file system", "os error 30": "Read-only file system",
                  "file write failed": None, "failed writing file": None, "inline_container.cc": None,
                  "iostream error": None}


def write_failure(error: BaseException, folder: str | Path) -> str | None:
    """Why a save into `folder` failed when the disk is the reason (full, read-only, a write error); else None.

    torch's zip writer often names no cause ("unexpected pos ..."): the free space tells.
    """
    if isinstance(error, OSError):
        return error.strerror or str(error)
    text = str(error)
    for marker, reason in WRITE_FAILURES.items():
        if marker in text:
            if reason is not None:
                return reason
            free = shutil.disk_usage(folder).free
            return "No space left on device" if free < 2**20 else f"a file write failed, {free / 2**20:.0f} MiB free"
    return None


def disk_error(step: int, output_dir: str | Path, reason: str) -> PhivisionError:
    previous = complete_checkpoints(output_dir)
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    return PhivisionError(
        f"saving checkpoint-{step} into {output_dir} failed ({reason}); nothing of it was kept and {kept}. "
        "Free disk space (or lower save_total_limit) or make the folder writable, then resume with --resume auto"
    )
