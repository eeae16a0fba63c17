"""`phivision convert ucf101`: the dataset rebuilt small in its real layouts, to exact jsonl lines and frame files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import files_under, indices_of, jsonl_lines, write_clip
from PIL import Image

from phivision.cli.main import main
from phivision.data.converters.ucf101 import convert_ucf101
from phivision.processing import video

SEED_LINE = (
    '{"id": "val-0000000300", "source": "ucf101", "conversations": [{"images": ['
    '"val/BabyCrawling/v_BabyCrawling_g21_c04.0.jpg", "val/BabyCrawling/v_BabyCrawling_g21_c04.1.jpg", '
    '"val/BabyCrawling/v_BabyCrawling_g21_c04.2.jpg", "val/BabyCrawling/v_BabyCrawling_g21_c04.3.jpg", '
    '"val/BabyCrawling/v_BabyCrawling_g21_c04.4.jpg", "val/BabyCrawling/v_BabyCrawling_g21_c04.5.jpg", '
    '"val/BabyCrawling/v_BabyCrawling_g21_c04.6.jpg", "val/BabyCrawling/v_BabyCrawling_g21_c04.7.jpg"], '
    '"user": "Classify the video into one of the following classes: ApplyEyeMakeup, ApplyLipstick, Archery, '
    'BabyCrawling, BalanceBeam, BandMarching, BaseballPitch, Basketball, BasketballDunk, BenchPress.", '
    '"assistant": "BabyCrawling"}]}'
)
SEED_CLASSES = json.loads(SEED_LINE)["conversations"][0]["user"].split(": ")[1].rstrip(".").split(", ")


def ucf_lines(split: str, videos: list[str], classes: list[str], frames: int, folder: str | None = None,
              indices: list[int] | None = None) -> list[str]:
    """The expected jsonl lines of `videos` ("Class/stem", in output order) in `split`.

    `folder` is where the .avi files lie under SRC (default: the split's name, the subset layout);
    `indices` their places in the split's sorted list (default: 0, 1, ...).
    """
    user = f"Classify the video into one of the following classes: {', '.join(classes)}."
    return [
        json.dumps({"id": f"{split}-{index:010d}", "source": "ucf101", "conversations": [
            {"images": frame_files(split, [name], frames), "user": user, "assistant": name.split("/")[0]}
        ], "video": f"{folder or split}/{name}.avi"})  # fmt: skip
        for index, name in zip(indices or range(len(videos)), videos)
    ]


def frame_files(split: str, videos: list[str], frames: int) -> list[str]:
    return [f"{split}/{name}.{k}.jpg" for name in videos for k in range(frames)]


def clip(path: Path, num_frames: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_clip(path, num_frames)


# ---- ucf101 ----


def test_ucf101_lines_have_the_seed_shape(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "UCF101_subset", tmp_path / "out"
    for label in reversed(SEED_CLASSES):
        clip(src / "val" / label / f"v_{label}_g21_c04.avi", num_frames=4)

    assert main(["convert", "ucf101", str(src), str(out), "--workers", "1"]) == 0

    lines = jsonl_lines(out / "ucf101_val.jsonl")
    assert lines[3] == SEED_LINE.replace("val-0000000300", "val-0000000003")[:-1] + (
        ', "video": "val/BabyCrawling/v_BabyCrawling_g21_c04.avi"}')
    seed, ours = json.loads(SEED_LINE), json.loads(lines[3])
    assert list(seed) == ["id", "source", "conversations"]
    assert list(ours) == [*seed, "video"]  # the source video, after the official keys
    assert list(ours["conversations"][0]) == ["images", "user", "assistant"]
    assert lines == ucf_lines("val", [f"{label}/v_{label}_g21_c04" for label in SEED_CLASSES], SEED_CLASSES, 8)
    assert capsys.readouterr().out.splitlines() == [
        f"val: 10 samples -> {out / 'ucf101_val.jsonl'}",
        "skipped: 0 (already converted, not decoded again)",
        "failed: 0 (unreadable or missing, left out)",
    ]


def test_ucf101_subset_layout_in_parallel(tmp_path: Path) -> None:
    src, out = tmp_path / "subset", tmp_path / "out"
    videos = {
        "train": ["Archery/v_Archery_g01_c01", "Archery/v_Archery_g02_c01", "BabyCrawling/v_BabyCrawling_g01_c01"],
        "val": ["Archery/v_Archery_g03_c01"],
        "test": ["BabyCrawling/v_BabyCrawling_g04_c01"],
    }
    for split, names in videos.items():
        for name in reversed(names):
            clip(src / split / f"{name}.avi")

    summary = convert_ucf101(src, out, frames=4, workers=2)

    classes = ["Archery", "BabyCrawling"]
    for split, names in videos.items():
        assert jsonl_lines(out / f"ucf101_{split}.jsonl") == ucf_lines(split, names, classes, 4)
    frames = [f"images/{name}" for split, names in videos.items() for name in frame_files(split, names, 4)]
    assert files_under(out) == sorted(["ucf101_test.jsonl", "ucf101_train.jsonl", "ucf101_val.jsonl"] + frames)
    # 10 frames, 4 sampled: np.arange(0, 10, 2.5) -> frames 0, 2, 5, 7
    written = [Image.open(out / "images/val/Archery" / f"v_Archery_g03_c01.{k}.jpg") for k in range(4)]
    assert indices_of(written) == [0, 2, 5, 7]
    assert summary["records"] == {"train": 3, "val": 1, "test": 1}
    assert (summary["skipped"], summary["failed"]) == (0, 0)


def full_dataset(src: Path, videos: list[str], lists: dict[str, list[str]]) -> None:
    """`UCF-101/` with the given videos and `ucfTrainTestlist/` with the given list files (CRLF, as shipped)."""
    for relative in videos:
        clip(src / "UCF-101" / relative, num_frames=4)
    (src / "ucfTrainTestlist").mkdir()
    (src / "ucfTrainTestlist" / "classInd.txt").write_bytes(b"1 ApplyEyeMakeup\r\n2 Archery\r\n")
    for name, lines in lists.items():
        (src / "ucfTrainTestlist" / name).write_bytes("".join(line + "\r\n" for line in lines).encode())


def test_ucf101_full_dataset_carves_val_by_whole_groups(tmp_path: Path) -> None:
    src, out = tmp_path / "ucf", tmp_path / "out"
    train = [
        "Archery/v_Archery_g09_c02.avi 2",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c02.avi 1",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g09_c01.avi 1",
        "Archery/v_Archery_g08_c01.avi 2",
        "Archery/v_Archery_g09_c01.avi 2",
    ]
    test = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "Archery/v_Archery_g02_c01.avi"]
    unlisted = "Archery/v_Archery_g10_c01.avi"
    full_dataset(src, [line.split()[0] for line in train] + test + [unlisted], {
        "trainlist01.txt": train, "testlist01.txt": test,
    })  # fmt: skip

    summary = convert_ucf101(src, out, frames=2, val_groups=1)

    classes = ["ApplyEyeMakeup", "Archery"]
    expected = {
        "train": ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c02",
                  "Archery/v_Archery_g08_c01"],
        "val": ["ApplyEyeMakeup/v_ApplyEyeMakeup_g09_c01", "Archery/v_Archery_g09_c01", "Archery/v_Archery_g09_c02"],
        "test": ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01", "Archery/v_Archery_g02_c01"],
    }  # fmt: skip
    for split, names in expected.items():
        assert jsonl_lines(out / f"ucf101_{split}.jsonl") == ucf_lines(split, names, classes, 2, folder="UCF-101")
    groups = {
        split: {re.search(r"_g(\d+)_", name).group(1) for name in files_under(out / "images" / split)}
        for split in ("train", "val", "test")
    }
    assert groups == {"train": {"08"}, "val": {"09"}, "test": {"01", "02"}}
    assert files_under(out / "images") == sorted(
        name for split, names in expected.items() for name in frame_files(split, names, 2)
    )
    assert summary["records"] == {"train": 3, "val": 3, "test": 2}


def test_ucf101_full_dataset_other_split_and_val_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "ucf", tmp_path / "out"
    full_dataset(
        src,
        ["Archery/v_Archery_g01_c01.avi", "Archery/v_Archery_g08_c01.avi", "Archery/v_Archery_g09_c01.avi"],
        {
            "trainlist01.txt": ["Archery/v_Archery_g08_c01.avi 2", "Archery/v_Archery_g09_c01.avi 2"],
            "testlist01.txt": ["Archery/v_Archery_g01_c01.avi"],
            "trainlist02.txt": ["Archery/v_Archery_g01_c01.avi 2", "Archery/v_Archery_g09_c01.avi 2"],
            "testlist02.txt": ["Archery/v_Archery_g08_c01.avi", "Skiing/v_Skiing_g08_c01.avi"],
        },
    )
    # two train groups: the default of three held-out groups would leave none for training
    assert main(["convert", "ucf101", str(src), str(out)]) == 2
    assert "--val-groups 3 would leave no training data" in capsys.readouterr().err

    assert main(["convert", "ucf101", str(src), str(out), "--split", "2", "--val-groups", "1", "--workers", "1"]) == 2
    bad_list = src / "ucfTrainTestlist" / "testlist02.txt"
    expected = f"{bad_list}:2: 'Skiing/v_Skiing_g08_c01.avi' is not CLASS/FILE.avi with a class from classInd.txt"
    assert expected in capsys.readouterr().err

    bad_list.write_text("Archery/v_Archery_g08_c01.avi\n")
    assert main(["convert", "ucf101", str(src), str(out), "--split", "2", "--val-groups", "0", "--frames", "1"]) == 0
    assert files_under(out) == [
        "images/test/Archery/v_Archery_g08_c01.0.jpg",
        "images/train/Archery/v_Archery_g01_c01.0.jpg",
        "images/train/Archery/v_Archery_g09_c01.0.jpg",
        "ucf101_test.jsonl",
        "ucf101_train.jsonl",
    ]


def test_ucf101_resumes_without_decoding_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, out = tmp_path / "subset", tmp_path / "out"
    clip(src / "train/Archery/v_Archery_g01_c01.avi")
    clip(src / "train/Archery/v_Archery_g02_c01.avi")
    convert_ucf101(src, out, workers=1)
    lines = jsonl_lines(out / "ucf101_train.jsonl")
    mtimes = {path: path.stat().st_mtime_ns for path in (out / "images").rglob("*.jpg")}
    assert len(mtimes) == 16

    decoded = []
    real_load_frames = video.load_frames
    def counting_load_frames(path: Path, num_frames: int) -> list:
        decoded.append(Path(path).name)
        return real_load_frames(path, num_frames)

    monkeypatch.setattr(video, "load_frames", counting_load_frames)
    summary = convert_ucf101(src, out, workers=1)
    assert decoded == []
    assert (summary["skipped"], summary["records"]) == (2, {"train": 2})
    assert jsonl_lines(out / "ucf101_train.jsonl") == lines
    assert {path: path.stat().st_mtime_ns for path in mtimes} == mtimes

    (out / "images/train/Archery/v_Archery_g02_c01.5.jpg").unlink()
    summary = convert_ucf101(src, out, workers=1)
    assert decoded == ["v_Archery_g02_c01.avi"]
    assert summary["skipped"] == 1
    assert (out / "images/train/Archery/v_Archery_g02_c01.5.jpg").is_file()
    assert jsonl_lines(out / "ucf101_train.jsonl") == lines


def test_ucf101_corrupt_video_is_reported_and_left_out(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "subset", tmp_path / "out"
    clip(src / "train/Archery/v_Archery_g02_c01.avi")
    corrupt = src / "train/Archery/v_Archery_g01_c01.avi"
    corrupt.write_bytes(b"RIFF" + bytes(300))

    assert main(["convert", "ucf101", str(src), str(out), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert f"video {corrupt} cannot be opened" in captured.err
    assert "failed: 1 (unreadable or missing, left out)" in captured.out
    # The corrupt video sorts first: the good one keeps the id it has when converted without it.
    assert jsonl_lines(out / "ucf101_train.jsonl") == ucf_lines("train", ["Archery/v_Archery_g02_c01"], ["Archery"], 8,
                                                                indices=[1])
    assert not list((out / "images").rglob("v_Archery_g01_c01*"))

    assert main(["convert", "ucf101", str(src), str(tmp_path / "strict"), "--strict", "--workers", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"phivision convert: error: video {corrupt} cannot be opened")
    assert error.endswith("(run without --strict to leave such samples out)")
    assert "\n" not in error


def test_an_unreadable_video_shifts_no_other_id(tmp_path: Path) -> None:
    names = ["Archery/v_Archery_g01_c01", "Archery/v_Archery_g02_c01", "Archery/v_Archery_g03_c01",
             "BabyCrawling/v_BabyCrawling_g01_c01"]
    clean, damaged = tmp_path / "clean", tmp_path / "damaged"
    for name in names:
        clip(clean / "train" / f"{name}.avi", num_frames=4)
        clip(damaged / "train" / f"{name}.avi", num_frames=4)
    (damaged / "train" / f"{names[1]}.avi").write_bytes(b"RIFF" + bytes(300))

    convert_ucf101(clean, tmp_path / "out-clean", frames=2)
    summary = convert_ucf101(damaged, tmp_path / "out-damaged", frames=2)

    assert summary["failed"] == 1
    by_video = {json.loads(line)["video"]: json.loads(line)["id"] for line in jsonl_lines(tmp_path / "out-clean/ucf101_train.jsonl")}
    damaged_ids = {json.loads(line)["video"]: json.loads(line)["id"] for line in jsonl_lines(tmp_path / "out-damaged/ucf101_train.jsonl")}
    assert by_video == {f"train/{name}.avi": f"train-{index:010d}" for index, name in enumerate(names)}
    assert damaged_ids == {video: record_id for video, record_id in by_video.items() if video != f"train/{names[1]}.avi"}


def test_ucf101_unknown_layout_explains_both(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["convert", "ucf101", str(tmp_path), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path} is not a UCF101 folder" in error
    assert "SRC/{train,val,test}/CLASS/*.avi" in error and "SRC/UCF-101/CLASS/*.avi" in error
