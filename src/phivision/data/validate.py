"""Check a whole jsonl dataset before training, reporting every problem instead of the first.

Each line is parsed with the format rules of `phivision.data.format`, its image tags are checked
with the same `user_content` the processor uses, and every image or video it names must exist and
be non-empty. With `decode_images`, images are fully decoded (a truncated file fails only when its
pixel data is read, so `verify()` alone is not enough) and videos must open with a video stream.
Each distinct path is checked once, on a thread pool, since datasets often repeat images.
Problems read `file:line: message`. A repeated id is a problem (evaluation writes one prediction
per id) unless `allow_duplicate_ids`, which only counts them.
"""

from __future__ import annotations

import json
import math
import os
import stat
from array import array
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from phivision.data.format import (
    DEFAULT_FRAMES,
    Sample,
    default_image_root,
    is_video,
    iter_raw_lines,
    parse_sample,
    resolve_media,
)
from phivision.errors import PhivisionError
from phivision.processing.images import HIGH_DEPTH_MODES, high_depth_to_8bit
from phivision.processing.prompt import user_content

TokenCounter = Callable[[Sample], int]
CHUNK_LINES = 256


@dataclass(frozen=True)
class ValidationReport:
    """What `validate_file` found: the problems (first `max_problems`) and the dataset's summary counts."""

    file: Path
    problems: tuple[str, ...]
    problem_count: int
    samples: int
    valid_samples: int
    turns: int
    images_mean: float
    images_max: int
    duplicate_ids: int
    first_duplicate: str | None
    duplicates_allowed: bool
    token_p50: int | None
    token_p95: int | None
    token_max: int | None
    over_length: int
    max_length: int | None

    @property
    def clean(self) -> bool:
        return self.problem_count == 0

    def summary(self) -> str:
        lines = [
            f"{self.file}",
            f"  samples: {self.samples} ({self.valid_samples} valid, {self.samples - self.valid_samples} with problems)",
            f"  problems: {self.problem_count}",
            f"  turns: {self.turns}",
            f"  images per sample: mean {self.images_mean:.2f}, max {self.images_max}",
            f"  duplicate ids: {self.duplicate_ids}"
            + (f" (allowed; first: {self.first_duplicate})" if self.duplicates_allowed and self.first_duplicate else ""),
        ]
        if self.token_max is None:
            lines.append("  tokens per sample: not counted (needs a model folder: --model)")
        else:
            lines.append(f"  tokens per sample: p50 {self.token_p50}, p95 {self.token_p95}, max {self.token_max}")
        if self.max_length is not None:
            lines.append(f"  over max length {self.max_length}: {self.over_length}")
        lines.append("OK: no problems found" if self.clean else f"FAILED: {self.problem_count} problem(s)")
        return "\n".join(lines)


def validate_file(
    path: str | Path,
    image_root: str | Path | None = None,
    decode_images: bool = True,
    token_counter: TokenCounter | None = None,
    max_length: int | None = None,
    max_problems: int = 50,
    frames_default: int = DEFAULT_FRAMES,
    allow_duplicate_ids: bool = False,
) -> ValidationReport:
    """Every problem of a dataset (the first `max_problems` kept as text) and its statistics.

    `token_counter` maps a valid sample to its token length (the lead's processor builds one from
    a model folder); it is needed for `max_length`. Token lengths use nearest-rank percentiles.
    """
    path = Path(path)
    if max_length is not None and token_counter is None:
        raise PhivisionError("max_length needs a token counter (a model folder) to measure samples")
    root = Path(image_root) if image_root is not None else default_image_root(path)
    media = _MediaChecker(root, decode_images)
    tally = _Tally(path, max_problems, max_length, frames_default, allow_duplicate_ids)
    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 1))) as pool:
        for chunk in _chunks(iter_raw_lines(path), CHUNK_LINES):
            parsed = [_parse_line(raw, path, number) for number, raw in chunk]
            samples = [item for item in parsed if isinstance(item, Sample)]
            media.check_all((p for sample in samples for turn in resolve_media(sample, root) for p in turn), pool)
            for item in parsed:
                if isinstance(item, Sample):
                    tally.add_sample(item, _sample_problems(item, media, frames_default), token_counter)
                else:
                    tally.add_unparsable(item)
    if tally.samples == 0:
        tally.problem(f"{path}: the file has no samples (only blank lines); add one JSON object per line")
    return tally.report()


class DuplicateIds:
    """The first line of every id seen so far, to name both lines of a repeat."""

    def __init__(self) -> None:
        self.first_line_of: dict[str, int] = {}

    def repeat_of(self, sample: Sample) -> str | None:
        """The problem line for a sample whose id an earlier line already used, else None."""
        first = self.first_line_of.setdefault(sample.id, sample.line)
        if first == sample.line:
            return None
        return (f"{sample.where}: duplicate id {json.dumps(sample.id, ensure_ascii=False)} (first at line {first}); "
                "give every sample its own id (predictions are written per id)")


def check_unique_ids(samples: Iterable[Sample]) -> None:
    """Refuse a dataset with a repeated id, naming the first repeat and how many there are."""
    ids = DuplicateIds()
    repeats = [message for sample in samples if (message := ids.repeat_of(sample))]
    if repeats:
        more = f" (and {len(repeats) - 1} more repeated ids)" if len(repeats) > 1 else ""
        raise PhivisionError(f"{repeats[0]}{more}; or pass --allow-duplicate-ids")


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _parse_line(raw: bytes, path: Path, number: int) -> Sample | str:
    try:
        return parse_sample(raw, path, number)
    except PhivisionError as error:
        return str(error)


def _sample_problems(sample: Sample, media: _MediaChecker, frames_default: int) -> list[str]:
    """Tag and media problems of a sample that parsed, each as `file:line: message`."""
    problems = []
    firsts = sample.first_image_numbers(frames_default)
    for index, (turn, paths) in enumerate(zip(sample.turns, resolve_media(sample, media.root))):
        try:
            user_content(sample.id, index, turn.user, firsts[index], turn.num_images(frames_default))
        except PhivisionError as error:
            problems.append(f"{sample.where}: {error}")
        for name, media_path in zip(turn.images, paths):
            reason = media.problem(media_path)
            if reason:
                kind = "video" if is_video(name) else "image"
                problems.append(f"{sample.where}: turn {index + 1}: {kind} {name!r} {reason}")
    return problems


class _MediaChecker:
    """Per-path results, computed once: problem text, or None for a usable file."""

    def __init__(self, root: Path, decode: bool):
        self.root = root
        self.decode = decode
        self.results: dict[Path, str | None] = {}
        self.missing_fix = (
            "fix the path or add the file"
            if root.is_dir()
            else f"the image root {root} does not exist: pass the folder the paths are relative to (--image-root)"
        )

    def check_all(self, paths: Iterable[Path], pool: ThreadPoolExecutor) -> None:
        unseen = list(dict.fromkeys(path for path in paths if path not in self.results))
        self.results.update(zip(unseen, pool.map(self.check, unseen)))

    def problem(self, path: Path) -> str | None:
        return self.results[path]

    def check(self, path: Path) -> str | None:
        try:
            info = path.stat()
        except OSError:
            return f"not found at {path}; {self.missing_fix}"
        if stat.S_ISDIR(info.st_mode):
            return f"is a folder, not a file: {path}"
        if info.st_size == 0:
            return f"is an empty file (0 bytes) at {path}; re-export or remove it"
        if not self.decode:
            return None
        return _video_problem(path) if is_video(path.name) else _image_problem(path)


def _image_problem(path: Path) -> str | None:
    """Decode the pixels, as training will; JPEGs at 1/8 scale, which still reads the whole stream.

    PIL refuses images with a zero width or height when opening them, so they fail here too.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))
            image.load()
            if image.mode in HIGH_DEPTH_MODES:
                high_depth_to_8bit(image)  # refuses NaN or infinite pixels, as training would
    except PhivisionError as error:
        return f"cannot be used: {error}"
    except UnidentifiedImageError:
        return f"cannot be decoded (not an image format PIL can read) at {path}; replace or remove it"
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        return f"cannot be decoded ({error}) at {path}; replace or remove it"
    return None


def _video_problem(path: Path) -> str | None:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return f"has no video stream at {path}; check that it is a video file"
            if next(container.decode(video=0), None) is None:
                return f"has no decodable frames at {path}; re-encode or remove it"
    except av.FFmpegError as error:
        return f"cannot be opened as a video ({error.strerror or error}) at {path}; re-encode or remove it"
    return None


class _Tally:
    """Running counts over the file, so memory stays flat however many lines it has."""

    def __init__(self, path: Path, max_problems: int, max_length: int | None, frames_default: int,
                 allow_duplicate_ids: bool):
        self.path = path
        self.allow_duplicate_ids = allow_duplicate_ids
        self.frames_default = frames_default
        self.max_problems = max_problems
        self.max_length = max_length
        self.problems: list[str] = []
        self.problem_count = 0
        self.samples = self.parsed = self.valid = self.turns = self.images_total = self.images_max = 0
        self.ids = DuplicateIds()
        self.duplicates = 0
        self.first_duplicate: str | None = None
        self.token_lengths = array("q")
        self.over_length = 0

    def problem(self, message: str) -> None:
        self.problem_count += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(message)

    def add_unparsable(self, message: str) -> None:
        self.samples += 1
        self.problem(message)

    def add_sample(self, sample: Sample, problems: list[str], token_counter: TokenCounter | None) -> None:
        self.samples += 1
        self.parsed += 1
        self.turns += len(sample.turns)
        images = sample.num_images(self.frames_default)
        self.images_total += images
        self.images_max = max(self.images_max, images)
        repeat = self.ids.repeat_of(sample)
        if repeat:
            self.duplicates += 1
            self.first_duplicate = self.first_duplicate or repeat
            if not self.allow_duplicate_ids:
                problems = [*problems, repeat]
        if not problems and token_counter is not None:
            problems = self._measure(sample, token_counter)
        for message in problems:
            self.problem(message)
        self.valid += not problems

    def _measure(self, sample: Sample, token_counter: TokenCounter) -> list[str]:
        try:
            length = token_counter(sample)
        except PhivisionError as error:
            return [f"{sample.where}: {error}"]
        self.token_lengths.append(length)
        if self.max_length is not None and length > self.max_length:
            self.over_length += 1
            return [
                f"{sample.where}: sample {sample.id!r} is {length} tokens, over the max length {self.max_length}; "
                "shorten its text, use fewer images or crops, or raise the max length"
            ]
        return []

    def report(self) -> ValidationReport:
        lengths = sorted(self.token_lengths)
        return ValidationReport(
            file=self.path,
            problems=tuple(self.problems),
            problem_count=self.problem_count,
            samples=self.samples,
            valid_samples=self.valid,
            turns=self.turns,
            images_mean=self.images_total / self.parsed if self.parsed else 0.0,
            images_max=self.images_max,
            duplicate_ids=self.duplicates,
            first_duplicate=self.first_duplicate,
            duplicates_allowed=self.allow_duplicate_ids,
            token_p50=_nearest_rank(lengths, 50),
            token_p95=_nearest_rank(lengths, 95),
            token_max=lengths[-1] if lengths else None,
            over_length=self.over_length,
            max_length=self.max_length,
        )


def _nearest_rank(sorted_values: list[int], percent: float) -> int | None:
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(percent / 100 * len(sorted_values)) - 1)]
