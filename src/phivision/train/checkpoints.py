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


def resolve_resume(resume: str | None, output_dir: str | Path) -> str | None:
    """`auto` -> the latest complete checkpoint (or None for a fresh start); a path must be complete."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        checkpoints = complete_checkpoints(output_dir)
        return str(checkpoints[-1]) if checkpoints else None
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise PhivisionError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE_MARKER})")
    return str(path)


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
    """What a killed save left behind is incomplete by construction: remove it."""
    shutil.rmtree(staging_dir(output_dir), ignore_errors=True)


def publish(staged: Path, final: Path) -> None:
    """Atomic on POSIX: the checkpoint appears whole or not at all."""
    if final.exists():
        shutil.rmtree(final)
    staged.rename(final)


def disk_error(step: int, output_dir: str | Path, error: OSError) -> PhivisionError:
    previous = complete_checkpoints(output_dir)
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    return PhivisionError(
        f"saving the checkpoint at step {step} failed ({error.strerror or error}); {kept}. "
        "Free disk space (or lower save_total_limit) and resume with --resume auto"
    )
