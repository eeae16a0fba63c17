"""The demo datasets: real scans, right labels, clean splits, moving videos, byte-identical re-runs."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phivision.data import digits
from phivision.data.digits import (
    DIGIT_WORDS,
    MOTION_CLASSES,
    blank_images,
    write_digits_task,
    write_motion_task,
    write_pairs_task,
)

SMALL_MOTION = {"train": 20, "val": 4, "test": 8}


@pytest.fixture(scope="module")
def sklearn_digits():
    from sklearn.datasets import load_digits

    return load_digits()


@pytest.fixture(scope="module")
def digit_of_scan(sklearn_digits):
    """Maps the exact 8x8 pixels of every scan (all 1,797 are distinct) to its digit."""
    scans = np.rint(sklearn_digits.images * (255 / 16)).astype(np.uint8)
    return {scan.tobytes(): int(label) for scan, label in zip(scans, sklearn_digits.target)}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    counts = {
        "digits": write_digits_task(root / "digits"),
        "pairs": write_pairs_task(root / "pairs"),
        "motion": write_motion_task(root / "motion", videos_per_class=SMALL_MOTION),
    }
    return root, counts


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def digit_in_png(path: Path, digit_of_scan: dict, image_size: int = 32) -> int:
    """Reads the 8x8 source back from a nearest-neighbour upscale and looks up its label."""
    pixels = np.asarray(Image.open(path))
    step = image_size // 8
    return digit_of_scan[np.ascontiguousarray(pixels[::step, ::step]).tobytes()]


def file_hashes(folder: Path) -> set[str]:
    return {hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir()}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_digits_counts_are_stratified(tasks, sklearn_digits):
    root, counts = tasks
    counts = counts["digits"]
    assert counts == {"train": 1438, "test": 359}
    class_sizes = Counter(sklearn_digits.target.tolist())
    for split, count in counts.items():
        records = read_jsonl(root / "digits" / f"{split}.jsonl")
        assert len(records) == count
        answers = Counter(record["conversations"][0]["assistant"] for record in records)
        for digit, word in enumerate(DIGIT_WORDS):
            expected_test = round(class_sizes[digit] * 0.2)
            assert answers[word] == (expected_test if split == "test" else class_sizes[digit] - expected_test)


def test_digits_first_lines_are_exact(tasks):
    root, _ = tasks
    first_train = (root / "digits" / "train.jsonl").read_text(encoding="utf-8").splitlines()[0]
    first_test = (root / "digits" / "test.jsonl").read_text(encoding="utf-8").splitlines()[0]
    assert first_train == (
        '{"id": "digits-train-00000", "source": "digits", "conversations": [{"images": ["train/0000.png"], '
        '"user": "Which digit is shown?", "assistant": "zero"}]}'
    )
    assert first_test == (
        '{"id": "digits-test-00000", "source": "digits", "conversations": [{"images": ["test/0000.png"], '
        '"user": "Which digit is shown?", "assistant": "five"}]}'
    )
    record = read_jsonl(root / "digits" / "test.jsonl")[358]
    assert record["id"] == "digits-test-00358"
    assert list(record) == ["id", "source", "conversations"]


def test_digits_images_match_their_labels(tasks, digit_of_scan):
    root, _ = tasks
    for split in ("train", "test"):
        records = read_jsonl(root / "digits" / f"{split}.jsonl")
        for record in records[:: len(records) // 40]:
            turn = record["conversations"][0]
            path = root / "digits" / "images" / turn["images"][0]
            with Image.open(path) as image:
                assert image.size == (32, 32) and image.mode == "L"
            assert DIGIT_WORDS[digit_in_png(path, digit_of_scan)] == turn["assistant"]


def test_digits_test_scans_never_appear_in_train(tasks):
    root, _ = tasks
    train = file_hashes(root / "digits" / "images" / "train")
    test = file_hashes(root / "digits" / "images" / "test")
    assert len(train) == 1438 and len(test) == 359
    assert not train & test


def test_digits_image_size_is_configurable(tmp_path, digit_of_scan):
    write_digits_task(tmp_path, seed=1, test_fraction=0.5, image_size=16)
    record = read_jsonl(tmp_path / "test.jsonl")[0]
    path = tmp_path / "images" / record["conversations"][0]["images"][0]
    assert Image.open(path).size == (16, 16)
    assert DIGIT_WORDS[digit_in_png(path, digit_of_scan, image_size=16)] == record["conversations"][0]["assistant"]


def test_pairs_are_balanced_correct_and_never_equal(tasks, digit_of_scan):
    root, counts = tasks
    counts = counts["pairs"]
    assert counts == {"train": 1500, "test": 300}
    for split, count in counts.items():
        records = read_jsonl(root / "pairs" / f"{split}.jsonl")
        assert len(records) == count
        assert records[0]["id"] == f"digit-pairs-{split}-00000" and records[0]["source"] == "digit-pairs"
        answers = Counter(record["conversations"][0]["assistant"] for record in records)
        assert answers == {"yes": count // 2, "no": count // 2}
        for record in records:
            turn = record["conversations"][0]
            assert turn["user"] == "Is the first digit larger than the second?"
            assert all(image.startswith(f"{split}/") for image in turn["images"])
            first, second = (digit_in_png(root / "pairs" / "images" / image, digit_of_scan) for image in turn["images"])
            assert first != second
            assert turn["assistant"] == ("yes" if first > second else "no")


def test_pairs_use_the_digits_split(tasks):
    root, _ = tasks
    pair_test = file_hashes(root / "pairs" / "images" / "test")
    assert pair_test <= file_hashes(root / "digits" / "images" / "test")
    assert not pair_test & file_hashes(root / "pairs" / "images" / "train")


def test_motion_layout_is_ucf101_subset(tasks):
    root, counts = tasks
    assert counts["motion"] == {split: count * 4 for split, count in SMALL_MOTION.items()}
    groups_by_split = {}
    for split, count in SMALL_MOTION.items():
        groups_by_split[split] = set()
        for motion in MOTION_CLASSES:
            names = sorted(path.name for path in (root / "motion" / "UCF101_subset" / split / motion).iterdir())
            assert len(names) == count
            for name in names:
                match = re.fullmatch(rf"v_{motion}_g(\d\d)_c(\d\d)\.avi", name)
                assert match, name
                groups_by_split[split].add(int(match[1]))
    assert sorted(groups_by_split["test"]) == [1, 2, 3, 4]
    assert sorted(groups_by_split["val"]) == [5, 6, 7]
    assert min(groups_by_split["train"]) == 8 and max(groups_by_split["train"]) == 25


def centre_of_mass(frame: np.ndarray) -> np.ndarray:
    rows, cols = np.indices(frame.shape)
    weights = frame.astype(np.float64)
    return np.array([(cols * weights).sum(), (rows * weights).sum()]) / weights.sum()


@pytest.mark.parametrize("motion", MOTION_CLASSES)
def test_motion_clips_decode_and_move_the_named_way(tasks, motion):
    import av

    root, _ = tasks
    direction = {"SlideLeft": (-1, 0), "SlideRight": (1, 0), "SlideUp": (0, -1), "SlideDown": (0, 1)}[motion]
    for split in SMALL_MOTION:
        for path in sorted((root / "motion" / "UCF101_subset" / split / motion).iterdir())[:3]:
            with av.open(str(path)) as container:
                frames = [frame.to_ndarray(format="gray") for frame in container.decode(video=0)]
            assert len(frames) == 16 and frames[0].shape == (32, 32)
            centres = [centre_of_mass(frame) for frame in frames]
            shift = centres[-1] - centres[0]
            assert np.dot(shift, direction) > 6, (path.name, shift)
            assert abs(shift[direction.index(0)]) < 1.5, (path.name, shift)
            steps = np.diff([np.dot(centre, direction) for centre in centres])
            assert (steps > -0.5).all(), (path.name, steps)


def test_motion_splits_use_disjoint_scans(tmp_path, monkeypatch):
    scans_by_split: dict[str, set[bytes]] = {split: set() for split in SMALL_MOTION}
    last_scan = []
    real_slide_frames = digits.slide_frames

    def recording_slide_frames(scan, *args):
        last_scan.append(scan.tobytes())
        return real_slide_frames(scan, *args)

    def recording_write_avi(path, video):
        scans_by_split[path.parent.parent.name].add(last_scan[-1])

    monkeypatch.setattr(digits, "slide_frames", recording_slide_frames)
    monkeypatch.setattr(digits, "write_avi", recording_write_avi)
    write_motion_task(tmp_path, videos_per_class=SMALL_MOTION)
    assert [len(scans) for scans in scans_by_split.values()] == [4 * 18, 4 * 3, 4 * 4]
    assert not scans_by_split["train"] & scans_by_split["val"]
    assert not scans_by_split["train"] & scans_by_split["test"]
    assert not scans_by_split["val"] & scans_by_split["test"]


def test_blank_images_are_uniform_copies(tasks, tmp_path):
    root, _ = tasks
    jsonl_in = root / "pairs" / "test.jsonl"
    jsonl_out = blank_images(jsonl_in, tmp_path / "blank")
    assert jsonl_out == tmp_path / "blank" / "test.jsonl"
    assert jsonl_out.read_bytes() == jsonl_in.read_bytes()
    referenced = {image for record in read_jsonl(jsonl_out) for image in record["conversations"][0]["images"]}
    for image in referenced:
        blank = np.asarray(Image.open(tmp_path / "blank" / "images" / image))
        original = Image.open(root / "pairs" / "images" / image)
        assert blank.shape == (original.size[1], original.size[0])
        assert blank.min() == blank.max()
    assert len({(tmp_path / "blank" / "images" / image).read_bytes() for image in referenced}) == 1


def test_reruns_write_identical_bytes(tasks, tmp_path):
    root, _ = tasks
    write_digits_task(tmp_path / "digits")
    write_pairs_task(tmp_path / "pairs")
    write_motion_task(tmp_path / "motion", videos_per_class=SMALL_MOTION)
    for task in ("digits", "pairs", "motion"):
        assert tree_bytes(tmp_path / task) == tree_bytes(root / task), task


def test_other_seeds_give_other_splits(tasks, tmp_path):
    root, _ = tasks
    write_digits_task(tmp_path, seed=1)
    assert (tmp_path / "test.jsonl").read_bytes() != (root / "digits" / "test.jsonl").read_bytes()
