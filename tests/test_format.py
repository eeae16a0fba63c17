"""The jsonl format: parsing rules, streaming line access, lazy random access, media paths."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from phivision.data.format import (
    JsonlDataset,
    Sample,
    Turn,
    default_image_root,
    iter_lines,
    parse_sample,
    resolve_media,
)
from phivision.errors import PhivisionError

UCF_USER = (
    "Classify the video into one of the following classes: ApplyEyeMakeup, ApplyLipstick, Archery, "
    "BabyCrawling, BalanceBeam, BandMarching, BaseballPitch, Basketball, BasketballDunk, BenchPress."
)
UCF_LINE = json.dumps(
    {
        "id": "val-0000000300",
        "source": "ucf101",
        "conversations": [
            {
                "images": [f"val/BabyCrawling/v_BabyCrawling_g21_c04.{k}.jpg" for k in range(8)],
                "user": UCF_USER,
                "assistant": "BabyCrawling",
            }
        ],
    }
)
DOCVQA_LINE = json.dumps(
    {
        "id": 49153,
        "source": "docvqa",
        "conversations": [
            {"images": ["documents/pybv0228_81.png"], "user": "What is the date?", "assistant": "11/16/98"}
        ],
        "answers": ["11/16/98", "16 November 1998"],
        "question_type": ["layout"],
    }
)


def test_seed_ucf101_line_parses_to_one_turn_of_eight_frames():
    sample = parse_sample(UCF_LINE, "ucf.jsonl", 3)
    assert sample.id == "val-0000000300"
    assert sample.source == "ucf101"
    assert sample.answers is None
    assert (sample.file, sample.line, sample.where) == (Path("ucf.jsonl"), 3, "ucf.jsonl:3")
    (turn,) = sample.turns
    assert turn.images[0] == "val/BabyCrawling/v_BabyCrawling_g21_c04.0.jpg"
    assert turn.images[-1] == "val/BabyCrawling/v_BabyCrawling_g21_c04.7.jpg"
    assert (turn.user, turn.assistant, turn.frames) == (UCF_USER, "BabyCrawling", None)
    assert sample.num_images() == 8


def test_seed_docvqa_line_keeps_answers_converts_int_id_and_ignores_unknown_top_level_keys():
    sample = parse_sample(DOCVQA_LINE, "docvqa.jsonl", 1)
    assert sample.id == "49153"
    assert sample.answers == ("11/16/98", "16 November 1998")
    assert sample.turns == (Turn(images=("documents/pybv0228_81.png",), user="What is the date?", assistant="11/16/98"),)


def test_parse_accepts_objects_text_and_bytes_alike():
    obj = json.loads(UCF_LINE)
    assert parse_sample(obj, "a.jsonl", 1) == parse_sample(UCF_LINE, "a.jsonl", 1)
    assert parse_sample(UCF_LINE.encode() + b"\r\n", "a.jsonl", 1) == parse_sample(obj, "a.jsonl", 1)


def test_source_defaults_to_empty_and_images_to_no_images():
    sample = parse_sample({"id": "a", "conversations": [{"user": "Hi", "assistant": "Hello"}]}, "a.jsonl", 1)
    assert sample.source == ""
    assert sample.turns[0].images == ()
    assert sample.num_images() == 0


def test_video_files_count_as_their_frames_with_a_default_of_eight():
    turns = [
        {"images": ["clip.mp4"], "user": "What happens?", "assistant": "A jump."},
        {"images": ["a.jpg", "b.MKV"], "frames": 3, "user": "And here?", "assistant": "A fall."},
        {"images": ["c.png"], "user": "This one?", "assistant": "A digit."},
    ]
    sample = parse_sample({"id": "v", "conversations": turns}, "v.jsonl", 1)
    assert [turn.frames for turn in sample.turns] == [None, 3, None]
    assert [turn.num_images() for turn in sample.turns] == [8, 4, 1]
    assert sample.num_images() == 13
    assert sample.num_images(frames_default=2) == 7
    assert sample.first_image_numbers() == [1, 9, 13]
    assert sample.first_image_numbers(frames_default=2) == [1, 3, 7]


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"id": True, "conversations": []}, '"id" must be a non-empty string (or an integer), got true (a boolean)'),
        (
            {"id": "a", "conversations": [{"user": "Hi", "assistant": "Yo", "asistant": "Yo"}]},
            'turn 1 has unknown key "asistant" (did you mean "assistant"?); '
            'allowed keys: "images", "user", "assistant", "frames"',
        ),
        (
            {"id": "a", "conversations": [{"user": "Hi", "assistant": "Yo"}, {"user": " ", "assistant": "Yo"}]},
            'turn 2: "user" is empty; add the question or instruction',
        ),
        (
            {"id": "a", "conversations": [{"user": "Hi", "assistant": "Yo"}], "answers": []},
            '"answers" must be a non-empty list of reference answer strings, got [] (a list)',
        ),
    ],
)
def test_parse_errors_name_file_line_and_fix(obj, message):
    with pytest.raises(PhivisionError) as caught:
        parse_sample(obj, Path("data/train.jsonl"), 12)
    assert str(caught.value) == f"data/train.jsonl:12: {message}"


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _line(sample_id: str, user: str = "Hi") -> str:
    return json.dumps({"id": sample_id, "conversations": [{"user": user, "assistant": "Yo"}]})


def test_iter_lines_skips_blank_lines_and_a_byte_order_mark_and_keeps_real_line_numbers(tmp_path):
    path = _write(tmp_path / "d.jsonl", "\ufeff" + _line("a") + "\n\n   \n" + _line("b") + "\r\n\t\n" + _line("c"))
    assert [(number, json.loads(text)["id"]) for number, text in iter_lines(path)] == [(1, "a"), (4, "b"), (6, "c")]


def test_iter_lines_reports_a_line_that_is_not_utf8(tmp_path):
    latin1 = b'{"id": "caf\xe9", "conversations": [{"user": "Hi", "assistant": "Yo"}]}\n'
    path = _write(tmp_path / "d.jsonl", _line("a").encode() + b"\n" + latin1)
    lines = iter_lines(path)
    assert next(lines)[0] == 1
    with pytest.raises(PhivisionError, match=r"d\.jsonl:2: the line is not UTF-8 text \(byte 12\); re-save"):
        next(lines)


def test_missing_jsonl_file_is_one_clear_error(tmp_path):
    with pytest.raises(PhivisionError, match=r"nope\.jsonl: no such jsonl file; check the path"):
        JsonlDataset(tmp_path / "nope.jsonl")


@pytest.fixture()
def dataset_file(tmp_path) -> Path:
    text = "\ufeff" + _line("a") + "\n\n" + _line("b", "Hé ✓") + "\r\n   \n" + _line("c") + "\n\n"
    return _write(tmp_path / "d.jsonl", text)


def test_dataset_indexes_non_blank_lines_and_reads_any_sample(dataset_file):
    dataset = JsonlDataset(dataset_file)
    assert len(dataset) == 3
    assert [dataset[i].id for i in (2, 0, 1, -1)] == ["c", "a", "b", "c"]
    assert [dataset[i].line for i in range(3)] == [1, 3, 5]
    assert dataset[1].turns[0].user == "Hé ✓"
    assert [sample.id for sample in dataset.iter_samples()] == ["a", "b", "c"]
    assert list(dataset) == [dataset[0], dataset[1], dataset[2]]
    with pytest.raises(IndexError, match="sample 3 out of range"):
        dataset[3]


def test_dataset_reports_a_bad_line_only_when_it_is_read(tmp_path):
    path = _write(tmp_path / "d.jsonl", _line("a") + "\n{broken\n")
    dataset = JsonlDataset(path)
    assert len(dataset) == 2
    assert dataset[0].id == "a"
    with pytest.raises(PhivisionError, match=r"d\.jsonl:2: not valid JSON"):
        dataset[1]


def test_dataset_pickles_without_its_open_file(dataset_file):
    dataset = JsonlDataset(dataset_file)
    assert dataset[0].id == "a"
    state = dataset.__getstate__()
    assert state["_handle"] is None
    copy = pickle.loads(pickle.dumps(dataset))
    assert [copy[i].id for i in range(3)] == ["a", "b", "c"]


def _sample_id(sample: Sample) -> str:
    return sample.id


def test_dataset_serves_dataloader_workers(tmp_path):
    from torch.utils.data import DataLoader

    path = _write(tmp_path / "d.jsonl", "\n".join(_line(f"s{i}") for i in range(40)))
    dataset = JsonlDataset(path)
    dataset[0]
    loader = DataLoader(dataset, batch_size=None, num_workers=2, collate_fn=_sample_id)
    assert list(loader) == [f"s{i}" for i in range(40)]


def test_dataset_index_keeps_offsets_compact_for_large_files(tmp_path):
    path = _write(tmp_path / "big.jsonl", "\n".join(_line(f"s{i}") for i in range(100_000)) + "\n")
    dataset = JsonlDataset(path)
    assert len(dataset) == 100_000
    assert dataset._offsets.itemsize == 8
    assert dataset[99_999].id == "s99999"
    assert dataset[99_999].line == 100_000


def test_media_paths_join_the_image_root(tmp_path):
    sample = parse_sample(json.loads(UCF_LINE), tmp_path / "ucf.jsonl", 1)
    assert default_image_root(tmp_path / "ucf.jsonl") == tmp_path / "images"
    (paths,) = resolve_media(sample, tmp_path / "frames")
    assert paths[0] == tmp_path / "frames/val/BabyCrawling/v_BabyCrawling_g21_c04.0.jpg"
    assert len(paths) == 8
