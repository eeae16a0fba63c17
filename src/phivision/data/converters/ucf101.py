"""UCF101 action recognition as multi-image classification: each video becomes `frames` JPEG frames.

Two layouts are recognised:

* the subset (`UCF101_subset`): `SRC/{train,val,test}/CLASS/*.avi`, splits taken as they are
  (videos re-encoded to `.mp4` or another container of `format.VIDEO_SUFFIXES` are taken too);
* the full dataset: `SRC/UCF-101/CLASS/*.avi` with `SRC/ucfTrainTestlist/` (`classInd.txt`,
  `trainlist0N.txt`, `testlist0N.txt`). The official train list of split N loses its
  `val_groups` highest-numbered groups (`_gNN_` in the file names) to a validation split. Clips of
  one group come from one long recording, so whole groups move and no group is in two splits;
  the default of 3 is 1/6 of the 18 train groups (groups 23-25 for split 1).

Ids are `{split}-{index:010d}`, the video's place in its split's sorted list, so they stay the same
whichever videos fail to decode; each record names its source file in `video` (relative to SRC).

Conversion is resumable: a video whose frames are all on disk is not decoded again. Changing
`frames` therefore needs a fresh output folder.
"""

from __future__ import annotations

import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phivision.data.converters.common import Failures, progress, record, write_splits
from phivision.data.format import VIDEO_SUFFIXES
from phivision.errors import PhivisionError

SOURCE = "ucf101"
SUBSET_SPLITS = ("train", "val", "test")
JPEG_QUALITY = 95
GROUP = re.compile(r"_g(\d+)_c\d+", re.IGNORECASE)
LAYOUTS = (
    "expected either the subset layout SRC/{train,val,test}/CLASS/*.avi or the full dataset "
    "SRC/UCF-101/CLASS/*.avi with SRC/ucfTrainTestlist/ (classInd.txt, trainlist0N.txt, testlist0N.txt)"
)


@dataclass(frozen=True)
class Video:
    """One video to convert: its split, its class and its source file."""

    split: str
    label: str
    path: Path

    def frame_names(self, frames: int) -> list[str]:
        """Frame files relative to `OUT/images/`."""
        return [f"{self.split}/{self.label}/{self.path.stem}.{k}.jpg" for k in range(frames)]


def convert_ucf101(
    src: Path,
    out: Path,
    *,
    frames: int = 8,
    split: int = 1,
    val_groups: int = 3,
    workers: int = 1,
    strict: bool = False,
) -> dict[str, Any]:
    """Write `OUT/ucf101_{split}.jsonl` and the frames; `split` and `val_groups` apply to the full dataset."""
    src, out = Path(src), Path(out)
    if frames < 1:
        raise PhivisionError(f"--frames must be at least 1, got {frames}")
    videos, classes = _find_videos(src, split, val_groups)
    images = out / "images"
    pending = [video for video in videos if not all((images / name).is_file() for name in video.frame_names(frames))]
    failures = Failures(strict)
    failed = _extract_all(pending, images, frames, workers, failures)

    prompt = f"Classify the video into one of the following classes: {', '.join(classes)}."
    records_by_split: dict[str, list[dict[str, Any]]] = {}
    numbered = Counter()
    for video in videos:
        # Numbered in the sorted list before decoding: a video that fails shifts no other id.
        record_id = f"{video.split}-{numbered[video.split]:010d}"
        numbered[video.split] += 1
        split_records = records_by_split.setdefault(video.split, [])
        if video.path not in failed:
            split_records.append(record(record_id, SOURCE, video.frame_names(frames), prompt, video.label,
                                        video=video.path.relative_to(src).as_posix()))
    summary = write_splits(out, SOURCE, records_by_split)
    return {**summary, "skipped": len(videos) - len(pending), "failed": failures.count}


def _find_videos(src: Path, split: int = 1, val_groups: int = 3) -> tuple[list[Video], list[str]]:
    """Videos ordered by split, class and file name, and the sorted class names of the layout in `src`."""
    if (src / "UCF-101").is_dir() and (src / "ucfTrainTestlist").is_dir():
        return _full_dataset(src, split, val_groups)
    if any((src / name).is_dir() for name in SUBSET_SPLITS):
        return _subset(src)
    raise PhivisionError(f"{src} is not a UCF101 folder; {LAYOUTS}")


def _subset(src: Path) -> tuple[list[Video], list[str]]:
    videos = [
        Video(split, class_dir.name, path)
        for split in SUBSET_SPLITS
        if (src / split).is_dir()
        for class_dir in sorted(entry for entry in (src / split).iterdir() if entry.is_dir())
        for path in sorted(class_dir.iterdir())
        if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file()
    ]
    if not videos:
        raise PhivisionError(f"{src} holds no videos ({', '.join(VIDEO_SUFFIXES)}); {LAYOUTS}")
    return videos, sorted({video.label for video in videos})


def _full_dataset(src: Path, split: int, val_groups: int) -> tuple[list[Video], list[str]]:
    lists = src / "ucfTrainTestlist"
    if split not in (1, 2, 3):
        raise PhivisionError(f"--split must be 1, 2 or 3 (the official UCF101 splits), got {split}")
    if val_groups < 0:
        raise PhivisionError(f"--val-groups must be 0 or more, got {val_groups}")
    classes = _read_class_index(lists / "classInd.txt")
    train = _read_split_list(src, lists / f"trainlist0{split}.txt", classes)
    test = _read_split_list(src, lists / f"testlist0{split}.txt", classes)

    train_groups = sorted({group for _, _, group in train})
    if val_groups and val_groups >= len(train_groups):
        raise PhivisionError(
            f"--val-groups {val_groups} would leave no training data: the train list of split {split} "
            f"has {len(train_groups)} groups"
        )
    held_out = set(train_groups[len(train_groups) - val_groups :])
    by_split = {
        "train": [(label, path) for label, path, group in train if group not in held_out],
        "val": [(label, path) for label, path, group in train if group in held_out],
        "test": [(label, path) for label, path, _ in test],
    }
    videos = [
        Video(name, label, path)
        for name, entries in by_split.items()
        for label, path in sorted(entries, key=lambda entry: (entry[0], entry[1].name))
    ]
    return videos, sorted(classes)


def _read_class_index(path: Path) -> set[str]:
    """Class names from `classInd.txt` lines like `1 ApplyEyeMakeup`."""
    classes = set()
    for line_number, words in _list_lines(path):
        if len(words) != 2 or not words[0].isdigit():
            raise PhivisionError(f"{path}:{line_number}: expected `INDEX CLASS` like `1 ApplyEyeMakeup`")
        classes.add(words[1])
    if not classes:
        raise PhivisionError(f"{path} lists no classes; re-download ucfTrainTestlist")
    return classes


def _read_split_list(src: Path, path: Path, classes: set[str]) -> list[tuple[str, Path, int]]:
    """(class, video path, group number) per line of a train or test list."""
    entries = []
    for line_number, words in _list_lines(path):
        where = f"{path}:{line_number}"
        relative = words[0]
        label, _, name = relative.rpartition("/")
        if label not in classes:
            raise PhivisionError(f"{where}: {relative!r} is not CLASS/FILE.avi with a class from classInd.txt")
        group = GROUP.search(name)
        if group is None:
            raise PhivisionError(f"{where}: {name!r} has no group number; expected names like v_CLASS_g08_c01.avi")
        entries.append((label, src / "UCF-101" / relative, int(group.group(1))))
    if not entries:
        raise PhivisionError(f"{path} lists no videos; re-download ucfTrainTestlist")
    return entries


def _list_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, words) of the non-blank lines of a UCF101 list file."""
    if not path.is_file():
        raise PhivisionError(f"{path} is missing; the full dataset needs ucfTrainTestlist/ next to UCF-101/")
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            yield line_number, line.split()


def _extract_all(videos: list[Video], images: Path, frames: int, workers: int, failures: Failures) -> set[Path]:
    """Decode `videos` into frame files; the paths of those that could not be decoded."""
    jobs = [(video.path, [images / name for name in video.frame_names(frames)]) for video in videos]
    failed = set()
    with _results(jobs, frames, workers) as results:
        for path, error in progress(results, SOURCE, total=len(jobs)):
            if error is not None:
                failures.add(error)
                failed.add(path)
    return failed


@contextmanager
def _results(
    jobs: list[tuple[Path, list[Path]]], frames: int, workers: int
) -> Iterator[Iterator[tuple[Path, str | None]]]:
    """`_extract` over `jobs`, in this process or, with several workers, in a pool (ended on exit)."""
    tasks = [(path, frame_paths, frames) for path, frame_paths in jobs]
    if workers <= 1 or len(tasks) <= 1:
        yield map(_extract, tasks)
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
        yield pool.imap_unordered(_extract, tasks)


def _extract(task: tuple[Path, list[Path], int]) -> tuple[Path, str | None]:
    """Write one video's frames as JPEG: (video, None) or (video, the reason it failed)."""
    from phivision.processing.video import load_frames

    path, frame_paths, frames = task
    try:
        images = load_frames(path, frames)
    except PhivisionError as error:
        return path, str(error)
    for image, frame_path in zip(images, frame_paths):
        frame_path.parent.mkdir(parents=True, exist_ok=True)
        partial = frame_path.with_name(frame_path.name + ".partial")
        image.save(partial, format="JPEG", quality=JPEG_QUALITY)
        os.replace(partial, frame_path)
    return path, None
