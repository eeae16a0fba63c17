"""`phivision convert`: each public dataset, rebuilt small in its real layout, to exact jsonl lines and files."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_video import indices_of, write_clip

from phivision.cli.main import main
from phivision.data.converters.docvqa import convert_docvqa
from phivision.data.converters.nlvr2 import convert_nlvr2
from phivision.data.converters.ucf101 import convert_ucf101
from phivision.errors import PhivisionError
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


def ucf_lines(split: str, videos: list[str], classes: list[str], frames: int) -> list[str]:
    """The expected jsonl lines of `videos` ("Class/stem", in output order) in `split`."""
    user = f"Classify the video into one of the following classes: {', '.join(classes)}."
    return [
        json.dumps({"id": f"{split}-{index:010d}", "source": "ucf101", "conversations": [
            {"images": frame_files(split, [name], frames), "user": user, "assistant": name.split("/")[0]}
        ]})  # fmt: skip
        for index, name in enumerate(videos)
    ]


def frame_files(split: str, videos: list[str], frames: int) -> list[str]:
    return [f"{split}/{name}.{k}.jpg" for name in videos for k in range(frames)]


def jsonl_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def files_under(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def clip(path: Path, num_frames: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_clip(path, num_frames)


def image(path: Path, color: tuple[int, int, int], image_format: str = "PNG") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path, format=image_format)
    return path.read_bytes()


def write_lines(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")


# ---- ucf101 ----


def test_ucf101_lines_have_the_seed_shape(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "UCF101_subset", tmp_path / "out"
    for label in reversed(SEED_CLASSES):
        clip(src / "val" / label / f"v_{label}_g21_c04.avi", num_frames=4)

    assert main(["convert", "ucf101", str(src), str(out), "--workers", "1"]) == 0

    lines = jsonl_lines(out / "ucf101_val.jsonl")
    assert lines[3] == SEED_LINE.replace("val-0000000300", "val-0000000003")
    seed, ours = json.loads(SEED_LINE), json.loads(lines[3])
    assert list(ours) == list(seed) == ["id", "source", "conversations"]
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
        assert jsonl_lines(out / f"ucf101_{split}.jsonl") == ucf_lines(split, names, classes, 2)
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
    assert jsonl_lines(out / "ucf101_train.jsonl") == ucf_lines("train", ["Archery/v_Archery_g02_c01"], ["Archery"], 8)
    assert not list((out / "images").rglob("v_Archery_g01_c01*"))

    assert main(["convert", "ucf101", str(src), str(tmp_path / "strict"), "--strict", "--workers", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"phivision convert: error: video {corrupt} cannot be opened")
    assert error.endswith("(run without --strict to leave such samples out)")
    assert "\n" not in error


def test_ucf101_unknown_layout_explains_both(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["convert", "ucf101", str(tmp_path), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path} is not a UCF101 folder" in error
    assert "SRC/{train,val,test}/CLASS/*.avi" in error and "SRC/UCF-101/CLASS/*.avi" in error


# ---- docvqa ----


def test_docvqa_official_annotations(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "docvqa", tmp_path / "out"
    letter = image(src / "documents/txpn0095_1.png", (200, 10, 10))
    memo = image(src / "documents/ffbf0023_4.png", (10, 200, 10))

    def entry(question_id: int, question: str, document: str, answers: list[str] | None) -> dict:
        item = {"questionId": question_id, "question": question, "question_types": ["form"], "image": document}
        return item | ({"answers": answers} if answers is not None else {})

    (src / "train_v1.0.json").write_text(json.dumps({"dataset_split": "train", "data": [
        entry(52212, "Whose signature is given?", "documents/txpn0095_1.png", ["Edward R. Shannon", "Edward Shannon"]),
        entry(52213, "What is the date?", "documents/txpn0095_1.png", ["1/8/93"]),
        entry(7, "Qui a signé ?", "documents/ffbf0023_4.png", ["Émile"]),
    ]}))  # fmt: skip
    (src / "val_v1.0.json").write_text(json.dumps({"data": [
        entry(49153, "What is the ‘actual’ value per 1000?", "documents/ffbf0023_4.png", ["0.28"]),
        entry(49154, "Page?", "documents/missing_1.png", ["3"]),
    ]}))  # fmt: skip
    (src / "test_v1.0.json").write_text(json.dumps({"data": [entry(1, "Title?", "documents/ffbf0023_4.png", None)]}))

    summary = convert_docvqa(src, out)

    assert jsonl_lines(out / "docvqa_train.jsonl") == [
        r'{"id": "52212", "source": "docvqa", "conversations": [{"images": ["docvqa/documents/txpn0095_1.png"], '
        r'"user": "Whose signature is given?\nAnswer briefly.", "assistant": "Edward R. Shannon"}], '
        r'"answers": ["Edward R. Shannon", "Edward Shannon"]}',
        r'{"id": "52213", "source": "docvqa", "conversations": [{"images": ["docvqa/documents/txpn0095_1.png"], '
        r'"user": "What is the date?\nAnswer briefly.", "assistant": "1/8/93"}], "answers": ["1/8/93"]}',
        r'{"id": "7", "source": "docvqa", "conversations": [{"images": ["docvqa/documents/ffbf0023_4.png"], '
        r'"user": "Qui a signé ?\nAnswer briefly.", "assistant": "Émile"}], "answers": ["Émile"]}',
    ]
    assert jsonl_lines(out / "docvqa_val.jsonl") == [
        r'{"id": "49153", "source": "docvqa", "conversations": [{"images": ["docvqa/documents/ffbf0023_4.png"], '
        r'"user": "What is the ‘actual’ value per 1000?\nAnswer briefly.", "assistant": "0.28"}], '
        r'"answers": ["0.28"]}'
    ]
    assert files_under(out) == [
        "docvqa_train.jsonl",
        "docvqa_val.jsonl",
        "images/docvqa/documents/ffbf0023_4.png",
        "images/docvqa/documents/txpn0095_1.png",
    ]
    assert (out / "images/docvqa/documents/txpn0095_1.png").read_bytes() == letter
    assert (out / "images/docvqa/documents/ffbf0023_4.png").read_bytes() == memo
    missing = f"{src / 'val_v1.0.json'}, data[1]: image {src / 'documents/missing_1.png'} not found"
    assert missing in capsys.readouterr().err
    assert summary["records"] == {"train": 3, "val": 1}
    assert (summary["unlabeled"], summary["failed"]) == (1, 1)


def test_docvqa_parquet_layout(tmp_path: Path) -> None:
    pyarrow = pytest.importorskip("pyarrow", reason="pyarrow is needed only for the parquet layout")
    import pyarrow.parquet as parquet

    src, out = tmp_path / "docvqa", tmp_path / "out"
    src.mkdir()
    png = image(tmp_path / "a.png", (1, 2, 3))
    jpeg = image(tmp_path / "b.jpg", (4, 5, 6), "JPEG")
    text_type = pyarrow.list_(pyarrow.struct([("user", pyarrow.string()), ("assistant", pyarrow.string())]))
    struct_images = pyarrow.list_(pyarrow.struct([("bytes", pyarrow.binary()), ("path", pyarrow.string())]))
    def write(name: str, images: list, image_type: object, texts: list) -> None:
        table = pyarrow.table({"images": pyarrow.array(images, image_type), "texts": pyarrow.array(texts, text_type)})
        parquet.write_table(table, src / name)

    write(
        "train-00000-of-00002.parquet",
        [[{"bytes": png, "path": None}], [{"bytes": b"junk", "path": None}]],
        struct_images,
        [[{"user": "Who?", "assistant": "Ann"}, {"user": "When?\nAnswer briefly.", "assistant": "1990"}],
         [{"user": "What?", "assistant": "x"}]],
    )  # fmt: skip
    plain_images = pyarrow.list_(pyarrow.binary())
    write("train-00001-of-00002.parquet", [[jpeg]], plain_images, [[{"user": "Where?", "assistant": "Rome"}]])

    summary = convert_docvqa(src, out)

    assert jsonl_lines(out / "docvqa_train.jsonl") == [
        r'{"id": "train-00000000-0", "source": "docvqa", "conversations": [{"images": ["docvqa/train/00000000-0.png"], '
        r'"user": "Who?\nAnswer briefly.", "assistant": "Ann"}], "answers": ["Ann"]}',
        r'{"id": "train-00000000-1", "source": "docvqa", "conversations": [{"images": ["docvqa/train/00000000-0.png"], '
        r'"user": "When?\nAnswer briefly.", "assistant": "1990"}], "answers": ["1990"]}',
        r'{"id": "train-00000002-0", "source": "docvqa", "conversations": [{"images": ["docvqa/train/00000002-0.jpg"], '
        r'"user": "Where?\nAnswer briefly.", "assistant": "Rome"}], "answers": ["Rome"]}',
    ]
    assert (out / "images/docvqa/train/00000000-0.png").read_bytes() == png
    assert (out / "images/docvqa/train/00000002-0.jpg").read_bytes() == jpeg
    assert (summary["failed"], summary["unlabeled"]) == (1, 0)


def test_docvqa_parquet_without_pyarrow_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(PhivisionError, match=r"train-00000-of-00001\.parquet needs pyarrow: pip install pyarrow"):
        convert_docvqa(tmp_path, tmp_path / "out")


def test_docvqa_layout_and_option_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["convert", "docvqa", str(tmp_path), str(tmp_path / "out")]) == 2
    assert f"{tmp_path} is not a DocVQA folder; expected the official annotations" in capsys.readouterr().err

    (tmp_path / "val_v1.0.json").write_text('{"data": [{"questionId": 1,\n "question": }]}')
    assert main(["convert", "docvqa", str(tmp_path), str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'val_v1.0.json'}:2: not valid JSON" in capsys.readouterr().err

    assert main(["convert", "docvqa", str(tmp_path), str(tmp_path / "out"), "--frames", "4", "--workers", "2"]) == 2
    assert "--frames, --workers: ucf101 options, not used by docvqa; remove them" in capsys.readouterr().err


# ---- hateful memes ----


def test_hateful_memes_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "hateful_memes", tmp_path / "out"
    first = image(src / "img/42953.png", (1, 1, 1))
    image(src / "img/23058.png", (2, 2, 2))
    image(src / "img/13894.png", (3, 3, 3))
    write_lines(src / "train.jsonl", [
        {"id": 42953, "img": "img/42953.png", "label": 0, "text": "its their character not their color that matters"},
        {"id": 23058, "img": "img/23058.png", "label": 1, "text": 'they said "café" is for them'},
    ])  # fmt: skip
    write_lines(src / "dev_seen.jsonl", [{"id": 13894, "img": "img/13894.png", "label": 0, "text": "look!"}])
    write_lines(src / "test.jsonl", [{"id": 13894, "img": "img/13894.png", "text": "look!"}])

    assert main(["convert", "hateful-memes", str(src), str(out)]) == 0

    assert jsonl_lines(out / "hateful_memes_train.jsonl") == [
        r'{"id": "42953", "source": "hateful_memes", "conversations": [{"images": ["hateful_memes/img/42953.png"], '
        r'"user": "Is this meme hateful? The meme' + "'" + r's text reads: \"its their character not their color that '
        r'matters\"\nAnswer yes or no.", "assistant": "no"}]}',
        r'{"id": "23058", "source": "hateful_memes", "conversations": [{"images": ["hateful_memes/img/23058.png"], '
        r'"user": "Is this meme hateful? The meme' + "'" + r's text reads: \"they said \"café\" is for them\"'
        r'\nAnswer yes or no.", "assistant": "yes"}]}',
    ]
    assert jsonl_lines(out / "hateful_memes_dev_seen.jsonl") == [
        r'{"id": "13894", "source": "hateful_memes", "conversations": [{"images": ["hateful_memes/img/13894.png"], '
        r'"user": "Is this meme hateful? The meme' + "'" + r's text reads: \"look!\"\nAnswer yes or no.", '
        r'"assistant": "no"}]}'
    ]
    assert files_under(out) == [
        "hateful_memes_dev_seen.jsonl",
        "hateful_memes_train.jsonl",
        "images/hateful_memes/img/13894.png",
        "images/hateful_memes/img/23058.png",
        "images/hateful_memes/img/42953.png",
    ]
    assert (out / "images/hateful_memes/img/42953.png").read_bytes() == first
    assert capsys.readouterr().out.splitlines() == [
        f"dev_seen: 1 samples -> {out / 'hateful_memes_dev_seen.jsonl'}",
        f"train: 2 samples -> {out / 'hateful_memes_train.jsonl'}",
        "unlabeled: 1 (without a label or answer, left out)",
        "failed: 0 (unreadable or missing, left out)",
    ]


def test_hateful_memes_missing_image_and_bad_label(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "hateful_memes", tmp_path / "out"
    image(src / "img/1.png", (1, 1, 1))
    write_lines(src / "train.jsonl", [
        {"id": 1, "img": "img/1.png", "label": 1, "text": "a"},
        {"id": 2, "img": "img/2.png", "label": 0, "text": "b"},
    ])  # fmt: skip
    assert main(["convert", "hateful-memes", str(src), str(out), "--strict"]) == 2
    error = capsys.readouterr().err
    assert f"{src / 'train.jsonl'}:2: image {src / 'img/2.png'} not found (run without --strict" in error

    assert main(["convert", "hateful-memes", str(src), str(out)]) == 0
    assert [json.loads(line)["id"] for line in jsonl_lines(out / "hateful_memes_train.jsonl")] == ["1"]
    assert "failed: 1" in capsys.readouterr().out

    write_lines(src / "train.jsonl", [{"id": 1, "img": "img/1.png", "label": "maybe", "text": "a"}])
    assert main(["convert", "hateful-memes", str(src), str(out)]) == 2
    assert f"{src / 'train.jsonl'}:1: label 'maybe' is not 0/1 or True/False" in capsys.readouterr().err


# ---- nlvr2 ----


def test_nlvr2_pairs_from_flat_and_numbered_folders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "nlvr2", tmp_path / "out"
    dev_left = image(src / "images/dev/dev-850-0-img0.png", (1, 0, 0))
    image(src / "images/dev/dev-850-0-img1.png", (2, 0, 0))
    train_right = image(src / "train/57/train-10171-0-img1.png", (3, 0, 0))
    image(src / "train/3/train-10171-0-img0.png", (4, 0, 0))
    image(src / "train/3/train-4-1-img0.png", (5, 0, 0))
    write_lines(src / "dev.json", [
        {"identifier": "dev-850-0-0", "sentence": "There are two dogs.", "label": "True", "left_url": "x"},
        {"identifier": "dev-850-0-1", "sentence": "Nothing is ‘blue’.", "label": "False"},
    ])  # fmt: skip
    write_lines(src / "train.json", [
        {"identifier": "train-10171-0-3", "sentence": "A bird flies.", "label": "False"},
        {"identifier": "train-4-1-0", "sentence": "One image only.", "label": "True"},
    ])  # fmt: skip
    write_lines(src / "test1.json", [{"identifier": "test1-0-0-0", "sentence": "s", "label": "True"}])

    summary = convert_nlvr2(src, out)

    question = "Is the following sentence true of the pair of images?"
    assert jsonl_lines(out / "nlvr2_dev.jsonl") == [
        r'{"id": "dev-850-0-0", "source": "nlvr2", "conversations": [{"images": '
        r'["nlvr2/dev/dev-850-0-img0.png", "nlvr2/dev/dev-850-0-img1.png"], '
        rf'"user": "{question} \"There are two dogs.\"\nAnswer yes or no.", "assistant": "yes"}}]}}',
        r'{"id": "dev-850-0-1", "source": "nlvr2", "conversations": [{"images": '
        r'["nlvr2/dev/dev-850-0-img0.png", "nlvr2/dev/dev-850-0-img1.png"], '
        rf'"user": "{question} \"Nothing is ‘blue’.\"\nAnswer yes or no.", "assistant": "no"}}]}}',
    ]
    assert jsonl_lines(out / "nlvr2_train.jsonl") == [
        r'{"id": "train-10171-0-3", "source": "nlvr2", "conversations": [{"images": '
        r'["nlvr2/train/train-10171-0-img0.png", "nlvr2/train/train-10171-0-img1.png"], '
        rf'"user": "{question} \"A bird flies.\"\nAnswer yes or no.", "assistant": "no"}}]}}',
    ]
    assert files_under(out) == [
        "images/nlvr2/dev/dev-850-0-img0.png",
        "images/nlvr2/dev/dev-850-0-img1.png",
        "images/nlvr2/train/train-10171-0-img0.png",
        "images/nlvr2/train/train-10171-0-img1.png",
        "nlvr2_dev.jsonl",
        "nlvr2_train.jsonl",
    ]
    assert (out / "images/nlvr2/dev/dev-850-0-img0.png").read_bytes() == dev_left
    assert (out / "images/nlvr2/train/train-10171-0-img1.png").read_bytes() == train_right
    error = capsys.readouterr().err
    assert f"{src / 'train.json'}:2: image train-4-1-img1 not found under {src / 'train'}" in error
    no_folder = f"{src / 'test1.json'}: no image folder {src / 'images/test1'} or {src / 'test1'}; split test1 left out"
    assert no_folder in error
    assert summary["records"] == {"dev": 2, "train": 1}
    assert (summary["failed"], summary["unlabeled"]) == (2, 0)


def test_nlvr2_without_annotations_explains_the_layout(tmp_path: Path) -> None:
    with pytest.raises(PhivisionError, match=r"is not an NLVR2 folder; expected SRC/\{train,dev,test1\}\.json"):
        convert_nlvr2(tmp_path, tmp_path / "out")

