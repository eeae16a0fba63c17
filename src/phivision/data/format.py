"""The training data format: one JSON object per line, parsed lazily and checked strictly.

A line looks like::

    {"id": "doc-1", "source": "docvqa", "answers": ["12", "twelve"],
     "conversations": [{"images": ["docs/a.png"], "user": "How many?", "assistant": "12"}]}

Rules, each enforced by `parse_sample` with one message naming the file, the line and the fix:

- `id`: a non-empty string; an integer is accepted and converted to its decimal string.
  Duplicate ids are not an error here (the validator warns about them).
- `source`: optional string (the dataset a sample came from), "" when absent.
- `answers`: optional non-empty list of strings, every reference answer (ANLS scores against all).
- `conversations`: a non-empty list of turns. A turn is an object with exactly these keys:
  `user` (non-empty string), `assistant` (non-empty string: training needs an answer in every
  turn), `images` (optional list of non-empty path strings, may be empty) and `frames`.
- Unknown top-level keys are allowed and ignored: datasets carry their own metadata.
  Unknown keys inside a turn are an error naming the key, since they are nearly always typos
  ("asistant") that would otherwise silently drop an answer.
- Image paths are relative to an image root, by default `images/` beside the jsonl file.
  A video is either a list of frame images or one video file (`.mp4`, `.avi`, `.mov`, `.mkv`,
  `.webm`) listed in `images`; a turn with a video file may set `frames: k` (a positive integer,
  default `DEFAULT_FRAMES` = 8): each video file then stands for k images decoded on the fly.
  `frames` in a turn without a video file is an error, as it would have no effect.
- Blank lines (empty or only whitespace) are skipped and do not count as samples; line numbers
  in messages are still the file's real line numbers (1-based).
"""

from __future__ import annotations

import difflib
import json
import os
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from phivision.errors import PhivisionError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
DEFAULT_FRAMES = 8
TURN_KEYS = ("images", "user", "assistant", "frames")
DEFAULT_IMAGE_FOLDER = "images"
UTF8_BOM = b"\xef\xbb\xbf"


def is_video(name: str) -> bool:
    """Whether an `images` entry names a video file, which expands to `frames` images."""
    return name.lower().endswith(VIDEO_SUFFIXES)


@dataclass(frozen=True)
class Turn:
    """One exchange of a jsonl sample: image (or video) paths as written, the question and the answer."""

    images: tuple[str, ...]
    user: str
    assistant: str
    frames: int | None = None

    def num_images(self, frames_default: int = DEFAULT_FRAMES) -> int:
        """Images the model sees: a video file counts as its frames, an image as one."""
        frames = self.frames or frames_default
        return sum(frames if is_video(name) else 1 for name in self.images)


@dataclass(frozen=True)
class Sample:
    """One parsed jsonl line, with the file and line it came from (for messages)."""

    id: str
    source: str
    turns: tuple[Turn, ...]
    answers: tuple[str, ...] | None
    file: Path
    line: int

    def num_images(self, frames_default: int = DEFAULT_FRAMES) -> int:
        return sum(turn.num_images(frames_default) for turn in self.turns)

    def first_image_numbers(self, frames_default: int = DEFAULT_FRAMES) -> list[int]:
        """Each turn's first `<|image_k|>` number: tags are numbered across the whole conversation."""
        numbers, next_number = [], 1
        for turn in self.turns:
            numbers.append(next_number)
            next_number += turn.num_images(frames_default)
        return numbers

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def parse_sample(obj_or_text: Mapping[str, Any] | str | bytes, file: str | Path, line: int) -> Sample:
    """A checked `Sample` from a parsed object or one line of text; PhivisionError on any bad field."""
    file = Path(file)
    try:
        return _parse(_load_object(obj_or_text), file, line)
    except _Bad as bad:
        raise PhivisionError(f"{file}:{line}: {bad}") from None


class _Bad(Exception):
    """A problem in one line; `parse_sample` adds the file and line in front."""


def _load_object(obj_or_text: Mapping[str, Any] | str | bytes) -> Any:
    if isinstance(obj_or_text, bytes):
        try:
            obj_or_text = obj_or_text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _Bad(f"the line is not UTF-8 text (byte {error.start + 1}); re-save the file as UTF-8") from None
    if not isinstance(obj_or_text, str):
        return obj_or_text
    try:
        return json.loads(obj_or_text.strip())
    except json.JSONDecodeError as error:
        raise _Bad(
            f"not valid JSON: {error.msg} at column {error.colno}; each line must be one complete JSON object"
        ) from None


def _parse(obj: Any, file: Path, line: int) -> Sample:
    if not isinstance(obj, Mapping):
        raise _Bad(f'expected a JSON object {{"id": ..., "conversations": [...]}}, got {_kind(obj)}')
    sample_id, source, answers = _parse_id(obj), _parse_source(obj), _parse_answers(obj)
    if "conversations" not in obj:
        raise _Bad('missing "conversations"; add a list of turns like [{"user": "...", "assistant": "..."}]')
    conversations = obj["conversations"]
    if not isinstance(conversations, list):
        raise _Bad(f'"conversations" must be a list of turns, got {_kind(conversations)}')
    if not conversations:
        raise _Bad('"conversations" is empty; add at least one {"user": "...", "assistant": "..."} turn')
    turns = tuple(_parse_turn(turn, index) for index, turn in enumerate(conversations))
    return Sample(id=sample_id, source=source, turns=turns, answers=answers, file=file, line=line)


def _parse_id(obj: Mapping[str, Any]) -> str:
    if "id" not in obj:
        raise _Bad('missing "id"; give every sample a unique string id')
    value = obj["id"]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f'"id" must be a non-empty string (or an integer), got {_kind(value)}')
    return value


def _parse_source(obj: Mapping[str, Any]) -> str:
    value = obj.get("source", "")
    if not isinstance(value, str):
        raise _Bad(f'"source" must be a string naming the dataset, got {_kind(value)}')
    return value


def _parse_answers(obj: Mapping[str, Any]) -> tuple[str, ...] | None:
    if "answers" not in obj:
        return None
    value = obj["answers"]
    if not isinstance(value, list) or not value or not all(isinstance(answer, str) for answer in value):
        raise _Bad(f'"answers" must be a non-empty list of reference answer strings, got {_kind(value)}')
    return tuple(value)


def _parse_turn(turn: Any, index: int) -> Turn:
    where = f"turn {index + 1}"
    if not isinstance(turn, Mapping):
        raise _Bad(f'{where} must be an object like {{"user": "...", "assistant": "..."}}, got {_kind(turn)}')
    for key in turn:
        if key not in TURN_KEYS:
            raise _Bad(f"{where} has unknown key {_quoted(key)}{_suggestion(key)}; allowed keys: {_quoted_list(TURN_KEYS)}")
    user = _required_text(turn, "user", where, "add the question or instruction")
    assistant = _required_text(turn, "assistant", where, "training needs an answer in every turn")
    images = _parse_images(turn.get("images", []), where)
    return Turn(images=images, user=user, assistant=assistant, frames=_parse_frames(turn, images, where))


def _required_text(turn: Mapping[str, Any], key: str, where: str, fix: str) -> str:
    if key not in turn:
        raise _Bad(f'{where} is missing "{key}"; {fix}')
    value = turn[key]
    if not isinstance(value, str):
        raise _Bad(f'{where}: "{key}" must be a string, got {_kind(value)}')
    if not value.strip():
        raise _Bad(f'{where}: "{key}" is empty; {fix}')
    return value


def _parse_images(images: Any, where: str) -> tuple[str, ...]:
    if not isinstance(images, list):
        raise _Bad(f'{where}: "images" must be a list of paths like ["a.jpg"], got {_kind(images)}')
    for number, name in enumerate(images, start=1):
        if not isinstance(name, str) or not name.strip():
            raise _Bad(f'{where}: image {number} must be a non-empty path string, got {_kind(name)}')
    return tuple(images)


def _parse_frames(turn: Mapping[str, Any], images: tuple[str, ...], where: str) -> int | None:
    if "frames" not in turn:
        return None
    frames = turn["frames"]
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
        raise _Bad(f'{where}: "frames" must be a positive integer (frames sampled per video), got {_kind(frames)}')
    if not any(is_video(name) for name in images):
        raise _Bad(
            f'{where}: "frames" is set but the turn lists no video file ({", ".join(VIDEO_SUFFIXES)}); '
            "remove it or add the video"
        )
    return frames


def _kind(value: Any) -> str:
    """A value as the user wrote it in JSON, with its JSON type: what they need to find and fix it."""
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    kind = next((name for cls, name in kinds.items() if isinstance(value, cls)), "a number")
    shown = json.dumps(value, ensure_ascii=False, default=str)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{shown} ({kind})"


def _quoted(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def _quoted_list(keys: tuple[str, ...]) -> str:
    return ", ".join(_quoted(key) for key in keys)


def _suggestion(key: str) -> str:
    close = difflib.get_close_matches(key, TURN_KEYS, n=1, cutoff=0.6)
    return f" (did you mean {_quoted(close[0])}?)" if close else ""


def iter_raw_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of every non-blank line, streamed: memory does not grow with the file."""
    with _existing_file(path).open("rb") as handle:
        for number, _offset, raw in _scan(handle):
            yield number, raw


def _scan(handle: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, bytes) of the non-blank lines; a UTF-8 byte order mark is skipped."""
    offset = 0
    for number, raw in enumerate(handle, start=1):
        start = 3 if number == 1 and raw.startswith(UTF8_BOM) else 0
        if raw[start:].strip():
            yield number, offset + start, raw[start:]
        offset += len(raw)


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line; PhivisionError naming the line if not UTF-8."""
    for number, raw in iter_raw_lines(path):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise PhivisionError(
                f"{path}:{number}: the line is not UTF-8 text (byte {error.start + 1}); re-save the file as UTF-8"
            ) from None


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise PhivisionError(f"{path}: no such jsonl file; check the path")
    return path


class JsonlDataset:
    """Random access to the samples of a jsonl file without holding it in memory.

    One streaming pass records the byte offset and line number of every non-blank line (16 bytes
    per sample); `dataset[i]` seeks there and parses that one line. The open file handle is not
    pickled and is reopened in each process, so DataLoader workers never share a file position.
    """

    def __init__(self, path: str | Path):
        self.path = _existing_file(path)
        self._offsets = array("q")
        self._lines = array("q")
        self._index()
        self._handle = None
        self._handle_pid = -1

    def _index(self) -> None:
        with self.path.open("rb") as handle:
            for number, offset, _raw in _scan(handle):
                self._offsets.append(offset)
                self._lines.append(number)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {self.path} with {len(self)} samples")
        handle = self._open()
        handle.seek(self._offsets[index])
        return parse_sample(handle.readline(), self.path, self._lines[index])

    def line_number(self, index: int) -> int:
        """The file line of sample `index`, for messages about a sample that failed to load."""
        return self._lines[index]

    def iter_samples(self) -> Iterator[Sample]:
        """Every sample in file order, read sequentially (faster than indexing one by one)."""
        for number, raw in iter_raw_lines(self.path):
            yield parse_sample(raw, self.path, number)

    def __iter__(self) -> Iterator[Sample]:
        return self.iter_samples()

    def _open(self) -> BinaryIO:
        """The file handle of this process: a forked worker must not share its parent's position."""
        if self._handle is None or self._handle_pid != os.getpid():
            self._handle = self.path.open("rb")
            self._handle_pid = os.getpid()
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_handle_pid"] = -1
        return state

    def __del__(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self._handle.close()


def default_image_root(jsonl_path: str | Path) -> Path:
    """`images/` beside the jsonl, where converters publish images, so a data folder moves as a whole."""
    return Path(jsonl_path).parent / DEFAULT_IMAGE_FOLDER


def resolve_media(sample: Sample, image_root: str | Path) -> list[list[Path]]:
    """Each turn's image and video paths joined to the image root (absolute paths stay as they are)."""
    root = Path(image_root)
    return [[root / name for name in turn.images] for turn in sample.turns]
