"""`phivision convert` for the image datasets: DocVQA, Hateful Memes and NLVR2, each rebuilt small in its real
layout, to exact jsonl lines and files, through the converter functions and the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import files_under, jsonl_lines, write_lines
from PIL import Image

from phivision.cli.main import main
from phivision.data.converters.docvqa import convert_docvqa
from phivision.data.converters.nlvr2 import convert_nlvr2
from phivision.errors import PhivisionError


def image(path: Path, color: tuple[int, int, int], image_format: str = "PNG") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path, format=image_format)
    return path.read_bytes()


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

