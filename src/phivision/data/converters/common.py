"""What every converter shares: the record shape, jsonl in and out, image publishing, failures.

Images are published under `OUT/images/` and records name them relative to that folder, so an
output folder can be moved as a whole and hold several converted datasets side by side.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from phivision.errors import PhivisionError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def record(
    record_id: str, source: str, images: list[str], user: str, assistant: str, **extra: Any
) -> dict[str, Any]:
    """One single-turn sample in the training jsonl format; `extra` keys follow `conversations`."""
    return {
        "id": record_id,
        "source": source,
        "conversations": [{"images": images, "user": user, "assistant": assistant}],
        **extra,
    }


def yes_no_question(question: str, quoted: str) -> str:
    """The one shape of the yes/no prompts: question, quoted text, and the answer format on its own line."""
    return f'{question} "{quoted}"\nAnswer yes or no.'


def yes_no(label: Any, where: str) -> str:
    """The answer to a yes/no prompt from a binary label written as 1/0, true/false or "True"/"False"."""
    if label in (1, "1", "True", "true"):
        return "yes"
    if label in (0, "0", "False", "false"):
        return "no"
    raise PhivisionError(f"{where}: label {label!r} is not 0/1 or True/False; is this the dataset's original file?")


def write_splits(out: Path, dataset: str, records_by_split: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Write `OUT/{dataset}_{split}.jsonl` per split that has records; the summary's `records` and `files`."""
    written = {split: records for split, records in records_by_split.items() if records}
    files = {}
    for split, records in written.items():
        path = out / f"{dataset}_{split}.jsonl"
        _write_jsonl(path, records)
        files[split] = str(path)
    return {"records": {split: len(records) for split, records in written.items()}, "files": files}


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write through a temporary name so an interrupted run never leaves a half-written jsonl."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as handle:
        for item in records:
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")
    os.replace(partial, path)


def read_json(path: Path) -> Any:
    """A whole-file JSON document, with the file and line of a syntax error."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PhivisionError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); re-download the file") from None
    except UnicodeDecodeError:
        raise PhivisionError(f"{path} is not UTF-8 text; re-download the file") from None


def read_json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise PhivisionError(f"{path} is not UTF-8 text; re-download the file") from None
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            message = f"{path}:{line_number}: not valid JSON ({error.msg}); fix or remove the line"
            raise PhivisionError(message) from None
        if not isinstance(item, dict):
            raise PhivisionError(f"{path}:{line_number}: expected a JSON object, got {type(item).__name__}")
        yield line_number, item


def require_field(item: dict[str, Any], key: str, where: str) -> Any:
    """`item[key]`, or an error naming the place and the missing key."""
    if key not in item:
        raise PhivisionError(f"{where}: missing the {key!r} field; is this the dataset's original file?")
    return item[key]


def publish_image(source: Path, destination: Path) -> None:
    """Hard-link (or copy, across file systems) unless an image of the same size is already there."""
    if destination.is_file() and destination.stat().st_size == source.stat().st_size:
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.unlink(missing_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def publish_sample_image(source: Path, destination: Path, where: str, failures: Failures) -> bool:
    """Publish a sample's image; False (after recording the failure) when it is missing."""
    if not source.is_file():
        failures.add(f"{where}: image {source} not found")
        return False
    publish_image(source, destination)
    return True


def progress(items: Iterable[Any], description: str, total: int | None = None) -> Iterable[Any]:
    """A tqdm bar on stderr, hidden when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(items, desc=description, total=total, unit="item", disable=None, file=sys.stderr)


def warn(message: str) -> None:
    """One line on stderr that does not break a progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


class Failures:
    """Bad samples: reported and left out, or, with `strict`, the end of the conversion."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.count = 0

    def add(self, message: str) -> None:
        """Record one failure; `message` names the file (and line) and the reason."""
        if self.strict:
            raise PhivisionError(f"{message} (run without --strict to leave such samples out)")
        self.count += 1
        warn(message)
