"""The demo's real datasets, built from scikit-learn's bundled handwritten digits (no network).

`load_digits()` ships 1,797 scanned 8x8 digits with ink values 0..16. Every image here is drawn
as white ink on black (ink 16 -> 255, no inversion, as in MNIST) and upscaled with nearest
neighbour: the 8x8 blocks stay sharp at any size, and the source pixels can be read back exactly
from a saved PNG, so tests can check every label against the original scan.

Three tasks cover the three input kinds the toolkit trains on: one image (which digit), several
images (is the first digit larger, NLVR2-style) and video (which way a digit slides, laid out like
the UCF-101 subset so that `phivision convert ucf101` reads it).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_QUESTION = "Which digit is shown?"
PAIRS_QUESTION = "Is the first digit larger than the second?"
MOTION_CLASSES = ("SlideLeft", "SlideRight", "SlideUp", "SlideDown")
MOTION_VIDEOS_PER_CLASS = MappingProxyType({"train": 60, "val": 12, "test": 20})
# UCF-101's official split 1 tests on groups 1-7 and trains on 8-25; val borrows the last test groups.
MOTION_GROUPS = MappingProxyType({"train": range(8, 26), "val": range(5, 8), "test": range(1, 5)})
MOTION_FPS = 25


def load_digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """(images as uint8 0..255 of shape (1797, 8, 8), labels); sklearn is imported only here."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.rint(digits.images * (255 / 16)).astype(np.uint8), digits.target.astype(np.int64)


def digit_image(scan: np.ndarray, size: int) -> Image.Image:
    """Nearest-neighbour upscaling keeps the strokes crisp and the 8x8 source recoverable."""
    return Image.fromarray(scan, mode="L").resize((size, size), Image.Resampling.NEAREST)


def stratified_split(labels: np.ndarray, seed: int, test_fraction: float) -> dict[str, np.ndarray]:
    """The same fraction of every digit goes to test; indices stay in scan order for readability."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    rng = np.random.default_rng(seed)
    test_indices = []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        test_indices.append(members[: round(len(members) * test_fraction)])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test_indices)] = True
    return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


def conversation_record(record_id: str, source: str, images: list[str], user: str, assistant: str) -> dict:
    return {
        "id": record_id,
        "source": source,
        "conversations": [{"images": images, "user": user, "assistant": assistant}],
    }


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_split_images(out: Path, split: str, scans: np.ndarray, image_size: int) -> list[str]:
    """Saves one PNG per scan as images/{split}/{position:04d}.png; returns the relative paths."""
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    relative_paths = []
    for position, scan in enumerate(scans):
        relative_path = f"{split}/{position:04d}.png"
        digit_image(scan, image_size).save(out / "images" / relative_path)
        relative_paths.append(relative_path)
    return relative_paths


def write_digits_task(out: Path, seed: int = 0, test_fraction: float = 0.2, image_size: int = 32) -> dict:
    """Single-image task: name the digit. Returns the number of samples per split."""
    out = Path(out)
    scans, labels = load_digit_scans()
    counts = {}
    for split, indices in stratified_split(labels, seed, test_fraction).items():
        image_paths = write_split_images(out, split, scans[indices], image_size)
        write_jsonl(
            out / f"{split}.jsonl",
            (
                conversation_record(f"digits-{split}-{i:05d}", "digits", [path], DIGITS_QUESTION, DIGIT_WORDS[label])
                for i, (path, label) in enumerate(zip(image_paths, labels[indices]))
            ),
        )
        counts[split] = len(indices)
    return counts


def write_pairs_task(
    out: Path,
    seed: int = 0,
    train_pairs: int = 1500,
    test_pairs: int = 300,
    image_size: int = 32,
    test_fraction: float = 0.2,
) -> dict:
    """Multi-image task: compare two digits of the same split, so test scans are never trained on.

    Answers are exactly balanced (the odd one out, if any, is `yes`) and the two digits always
    differ, so a model that ignores the images scores 50%.
    """
    out = Path(out)
    scans, labels = load_digit_scans()
    rng = np.random.default_rng(seed)
    counts = {}
    for split, indices in stratified_split(labels, seed, test_fraction).items():
        pair_count = train_pairs if split == "train" else test_pairs
        split_labels = labels[indices]
        positions_by_digit = [np.flatnonzero(split_labels == digit) for digit in range(10)]
        answers_yes = rng.permutation(np.arange(pair_count) < (pair_count + 1) // 2)
        pairs = []
        for answer_yes in answers_yes:
            smaller, larger = sorted(rng.choice(10, size=2, replace=False))
            first, second = (larger, smaller) if answer_yes else (smaller, larger)
            pairs.append((rng.choice(positions_by_digit[first]), rng.choice(positions_by_digit[second]), answer_yes))
        used_positions = sorted({int(position) for first, second, _ in pairs for position in (first, second)})
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for position in used_positions:
            digit_image(scans[indices[position]], image_size).save(folder / f"{position:04d}.png")
        write_jsonl(
            out / f"{split}.jsonl",
            (
                conversation_record(
                    f"digit-pairs-{split}-{i:05d}",
                    "digit-pairs",
                    [f"{split}/{first:04d}.png", f"{split}/{second:04d}.png"],
                    PAIRS_QUESTION,
                    "yes" if answer_yes else "no",
                )
                for i, (first, second, answer_yes) in enumerate(pairs)
            ),
        )
        counts[split] = pair_count
    return counts


def slide_frames(scan: np.ndarray, motion: str, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A half-canvas digit crossing most of a black canvas in one direction, at a random height."""
    digit = np.asarray(digit_image(scan, size // 2))
    slack = size - digit.shape[0]
    start = int(rng.integers(0, slack // 4 + 1))
    end = int(rng.integers(slack - slack // 4, slack + 1))
    if motion in ("SlideLeft", "SlideUp"):
        start, end = end, start
    across = np.rint(np.linspace(start, end, frames)).astype(int)
    fixed = int(rng.integers(0, slack + 1))
    video = np.zeros((frames, size, size), dtype=np.uint8)
    for frame, moving in zip(video, across):
        x, y = (moving, fixed) if motion in ("SlideLeft", "SlideRight") else (fixed, moving)
        frame[y : y + digit.shape[0], x : x + digit.shape[1]] = digit
    return video


def write_avi(path: Path, video: np.ndarray) -> None:
    """MPEG-4 Part 2 in AVI, like UCF-101's xvid clips; it round-trips every frame at 32x32."""
    import av

    with av.open(str(path), mode="w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=MOTION_FPS)
        stream.width, stream.height = video.shape[2], video.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")))
        container.mux(stream.encode())


def write_motion_task(
    out: Path,
    seed: int = 0,
    videos_per_class: Mapping[str, int] = MOTION_VIDEOS_PER_CLASS,
    frames: int = 16,
    size: int = 32,
) -> dict:
    """Video task as raw UCF-101-subset folders; `phivision convert ucf101` turns it into jsonl.

    As in UCF-101, a group is one "actor": every clip of a (class, group) slides the same scan,
    along a different path. Each split draws its scans from its own pool, so no scan crosses splits.
    Returns the number of videos per split.
    """
    if size % 2 or size < 8:
        raise ValueError(f"size must be even and at least 8 (the video codec needs it), got {size}")
    out = Path(out) / "UCF101_subset"
    scans, _ = load_digit_scans()
    rng = np.random.default_rng(seed)
    unused_scans = iter(rng.permutation(len(scans)))
    counts = {}
    for split, video_count in videos_per_class.items():
        groups = MOTION_GROUPS[split]
        for motion in MOTION_CLASSES:
            folder = out / split / motion
            folder.mkdir(parents=True, exist_ok=True)
            scan_by_group = {group: scans[next(unused_scans)] for group in groups[:video_count]}
            for video_index in range(video_count):
                group = groups[video_index % len(groups)]
                clip = video_index // len(groups) + 1
                video = slide_frames(scan_by_group[group], motion, frames, size, rng)
                write_avi(folder / f"v_{motion}_g{group:02d}_c{clip:02d}.avi", video)
        counts[split] = video_count * len(MOTION_CLASSES)
    return counts


def blank_images(jsonl_in: Path, out: Path) -> Path:
    """Copies a task with every image made uniformly black, so only the text is left to learn from.

    A model that truly reads images must fall to chance on the copy. Returns the new jsonl path.
    """
    jsonl_in, out = Path(jsonl_in), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    relative_paths = {
        image
        for line in jsonl_in.read_text(encoding="utf-8").splitlines()
        if line.strip()
        for turn in json.loads(line)["conversations"]
        for image in turn.get("images", [])
    }
    for relative_path in sorted(relative_paths):
        with Image.open(jsonl_in.parent / "images" / relative_path) as original:
            mode, size = original.mode, original.size
        target = out / "images" / relative_path
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size).save(target)
    jsonl_out = out / jsonl_in.name
    shutil.copyfile(jsonl_in, jsonl_out)
    return jsonl_out
