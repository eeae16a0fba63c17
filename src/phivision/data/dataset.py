"""From jsonl samples to processor encodings, lazily: each item reads its line and media on demand."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from phivision.data.format import DEFAULT_FRAMES, JsonlDataset, Sample, default_image_root, is_video, resolve_media
from phivision.data.validate import DuplicateIds, TokenCounter
from phivision.errors import PhivisionError
from phivision.processing.images import image_size, load_image
from phivision.processing.processor import ChatTurn, Encoded, Phi3VProcessor
from phivision.processing.video import load_frames, video_size

def load_media(paths: list[Path], frames: int | None) -> tuple[list[Image.Image], list[str]]:
    """Images and their names for errors; a video file stands for `frames` frames, sampled officially."""
    images: list[Image.Image] = []
    names: list[str] = []
    for path in paths:
        if is_video(path.name):
            video_frames = load_frames(path, frames or DEFAULT_FRAMES)
            images.extend(video_frames)
            names.extend(f"{path} frame {k + 1}" for k in range(len(video_frames)))
        else:
            images.append(load_image(path))
            names.append(str(path))
    return images, names


def media_sizes(paths: list[Path], frames: int | None, known: dict[Path, tuple[int, int]] | None = None
                ) -> list[tuple[int, int]]:
    """(width, height) per image: images from their headers (no decoding), videos from their first frame.

    `known` keeps each path's size across calls: DocVQA-like data asks many questions about one page.
    """
    known = {} if known is None else known
    sizes: list[tuple[int, int]] = []
    for path in paths:
        video = is_video(path.name)
        if path not in known:
            known[path] = video_size(path) if video else image_size(path)
        sizes.extend([known[path]] * ((frames or DEFAULT_FRAMES) if video else 1))
    return sizes


def chat_turns(sample: Sample, image_root: Path) -> list[ChatTurn]:
    turns = []
    for turn, paths in zip(sample.turns, resolve_media(sample, image_root)):
        images, names = load_media(paths, turn.frames)
        turns.append(ChatTurn(turn.user, turn.assistant, images, names))
    return turns


def sample_length(sample: Sample, image_root: Path, processor: Phi3VProcessor, train_on: str = "all",
                  known_sizes: dict[Path, tuple[int, int]] | None = None) -> int:
    """Exact token length of a training example, from image sizes alone (see `media_sizes`)."""
    counts = []
    texts = []
    for turn, paths in zip(sample.turns, resolve_media(sample, image_root)):
        sizes = media_sizes(paths, turn.frames, known_sizes)
        counts.extend(processor.image_token_count(width, height) for width, height in sizes)
        texts.append((turn.user, turn.assistant, len(sizes)))
    input_ids, _ = processor.conversation_ids(sample.id, texts, counts, train_on)
    return len(input_ids)


def build_token_counter(model_dir: str | Path, num_crops: int | None, data: str | Path,
                        image_root: str | Path | None = None) -> TokenCounter:
    """Exact training length of a sample, for `phivision validate --model`."""
    processor = Phi3VProcessor.from_pretrained(model_dir, num_crops=num_crops)
    root = Path(image_root) if image_root else default_image_root(data)
    known_sizes: dict[Path, tuple[int, int]] = {}
    return lambda sample: sample_length(sample, root, processor, "all", known_sizes)


class SampleError(PhivisionError):
    """A sample that fails when training loads it (e.g. an image truncated after its header).

    From a DataLoader worker, torch re-creates the error in the main process from the worker's
    formatted traceback; only the message after its last `SampleError: ` is kept, so the user
    still reads one line.
    """

    def __init__(self, message: str):
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].rstrip("\n")
        super().__init__(message)


class ConversationDataset(torch.utils.data.Dataset):
    """Training or evaluation examples; `indices` selects the lines that passed the up-front check."""

    def __init__(
        self,
        path: str | Path,
        processor: Phi3VProcessor,
        image_root: str | Path | None = None,
        train_on: str = "all",
        indices: list[int] | None = None,
        lengths: list[int] | None = None,
        for_generation: bool = False,
    ):
        self.path = Path(path)
        self.samples = JsonlDataset(self.path)
        self.processor = processor
        self.image_root = Path(image_root) if image_root else default_image_root(self.path)
        self.train_on = train_on
        self.indices = list(range(len(self.samples))) if indices is None else list(indices)
        self.lengths = lengths
        self.for_generation = for_generation

    def __len__(self) -> int:
        return len(self.indices)

    def sample(self, index: int) -> Sample:
        return self.samples[self.indices[index]]

    def __getitem__(self, index: int) -> Encoded:
        sample = self.sample(index)
        try:
            turns = chat_turns(sample, self.image_root)
            return self.processor.encode_conversation(
                sample.id, turns, train_on=self.train_on, for_generation=self.for_generation
            )
        except PhivisionError as error:
            raise SampleError(f"{sample.file}:{sample.line}: {error}") from None


@dataclass
class CheckedData:
    """What training may use: line positions, their exact token lengths, and what was skipped."""

    indices: list[int]
    lengths: list[int]
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)


# One measured sample: its token length, or (reason, `file:line: message`) with reason "invalid" or "too long".
Measured = int | tuple[str, str]


def part_of(count: int, part: int, parts: int) -> range:
    """Positions of contiguous block `part` of `parts` (consecutive samples often share an image)."""
    return range(count * part // parts, count * (part + 1) // parts)


def measure_samples(
    path: str | Path,
    processor: Phi3VProcessor,
    image_root: str | Path | None = None,
    max_length: int = 8192,
    train_on: str = "all",
    part: int = 0,
    parts: int = 1,
) -> list[Measured]:
    """Block `part` of `parts` of the samples, measured; the blocks of all parts, joined, are the whole file.

    Image sizes come from file headers, once per path, so a 40k-sample DocVQA takes seconds, not hours.
    """
    from tqdm.auto import tqdm

    samples = JsonlDataset(path)
    root = Path(image_root) if image_root else default_image_root(path)
    known_sizes: dict[Path, tuple[int, int]] = {}
    measured: list[Measured] = []
    positions = part_of(len(samples), part, parts)
    for position in tqdm(positions, desc=f"check {Path(path).name}", leave=False,
                         disable=part != 0 or len(positions) < 1000):
        try:
            sample = samples[position]
            length = sample_length(sample, root, processor, train_on, known_sizes)
        except PhivisionError as error:
            message = str(error)
            if not message.startswith(str(Path(path))):
                message = f"{path}:{samples.line_number(position)}: {message}"
            measured.append(("invalid", message))
            continue
        if length > max_length:
            measured.append(("too long",
                f"{sample.where}: sample {sample.id!r} is {length} tokens, over max_length={max_length} "
                "(image tokens are never truncated): raise max_length, lower num_crops, or set skip_too_long: true"
            ))
            continue
        measured.append(length)
    return measured


def with_repeated_ids_invalid(path: str | Path, measured: list[Measured]) -> list[Measured]:
    """A sample whose id an earlier line used is invalid: predictions are keyed by id.

    Done on the joined result, since a repeat may fall in another rank's part of the file.
    """
    samples, ids = JsonlDataset(path), DuplicateIds()
    marked = list(measured)
    for position, result in enumerate(measured):
        if isinstance(result, tuple) and result[0] == "invalid":
            continue  # the line may not even parse
        if repeat := ids.repeat_of(samples[position]):
            marked[position] = ("invalid", repeat)
    return marked


def check_dataset(
    path: str | Path,
    processor: Phi3VProcessor,
    image_root: str | Path | None = None,
    max_length: int = 8192,
    skip_invalid: bool = False,
    skip_too_long: bool = False,
    train_on: str = "all",
    measured: list[Measured] | None = None,
) -> CheckedData:
    """Every sample checked before training starts: a bad one is an error unless skipping was asked for.

    Image tokens are never truncated, so an over-long sample is either an error or skipped.
    `measured` is `measure_samples`' result for the whole file when it was computed in parts.
    """
    if measured is None:
        measured = measure_samples(path, processor, image_root, max_length, train_on)
    checked = CheckedData([], [])
    problems: dict[str, list[str]] = {"invalid": [], "too long": []}
    for position, result in enumerate(with_repeated_ids_invalid(path, measured)):
        if isinstance(result, int):
            checked.indices.append(position)
            checked.lengths.append(result)
        else:
            problems[result[0]].append(result[1])
    for reason, allowed, key in (("invalid", skip_invalid, "skip_invalid"), ("too long", skip_too_long, "skip_too_long")):
        found = problems[reason]
        if found and not allowed:
            shown = "\n  ".join(found[:10])
            more = f"\n  ... and {len(found) - 10} more" if len(found) > 10 else ""
            raise PhivisionError(
                f"{len(found)} {reason} sample(s) in {path}:\n  {shown}{more}\n"
                f"Fix them (see `phivision validate`), or set {key}: true to skip and count them"
            )
        if found:
            checked.skipped += len(found)
            checked.skip_reasons[reason] = len(found)
    if not checked.indices:
        raise PhivisionError(f"{path}: no usable samples")
    return checked
