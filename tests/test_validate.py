"""The validator and `phivision validate`: one exact message per bad input, counts, exit codes, speed."""

from __future__ import annotations

import argparse
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from helpers import write_undecodable_video

from phivision.cli import validate as validate_cli
from phivision.data.format import Sample
from phivision.data.validate import validate_file
from phivision.errors import PhivisionError

GOOD_TURN = {"images": ["good.png"], "user": "What digit is this?", "assistant": "7"}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write_video(path: Path, frames: int = 3) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            pixels = np.full((32, 32, 3), 40 * index, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """A data folder with `images/` holding one good file and every kind of broken one."""
    folder = tmp_path_factory.mktemp("data")
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(images / "good.png")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(images / "other.png")
    noisy = images / "noisy.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noisy)
    (images / "truncated.png").write_bytes(noisy.read_bytes()[: noisy.stat().st_size // 2])
    (images / "corrupt.png").write_bytes(rng.bytes(300))
    (images / "empty.png").write_bytes(b"")
    header = struct.pack(">IIBBBBB", 0, 4, 8, 2, 0, 0, 0)
    zero_width = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b"")
    (images / "zero-width.png").write_bytes(b"\x89PNG\r\n\x1a\n" + zero_width)
    (images / "folder.png").mkdir()
    _write_video(images / "clip.mp4")
    (images / "broken.mp4").write_bytes(rng.bytes(500))
    write_undecodable_video(images / "blank.avi")
    return folder


def _sample(sample_id: str = "ok", **fields) -> str:
    return json.dumps({"id": sample_id, "conversations": [GOOD_TURN], **fields})


def _turns(*turns: dict) -> str:
    return json.dumps({"id": "bad", "conversations": list(turns)})


# (case name, line 3 of the file, the message after "file:3: "); "{images}" is the image folder.
BAD_LINES = [
    ("broken json", '{"id": "x", "conversations": [', "not valid JSON: Expecting value at column 31; each line must be one complete JSON object"),
    ("trailing comma", '{"id": "x",}', "not valid JSON: Expecting property name enclosed in double quotes at column 12; each line must be one complete JSON object"),
    ("not an object", '["a", "b"]', 'expected a JSON object {"id": ..., "conversations": [...]}, got ["a", "b"] (a list)'),
    ("missing id", json.dumps({"conversations": [GOOD_TURN]}), 'missing "id"; give every sample a unique string id'),
    ("id wrong type", json.dumps({"id": 1.5, "conversations": [GOOD_TURN]}), '"id" must be a non-empty string (or an integer), got 1.5 (a number)'),
    ("id empty", json.dumps({"id": "", "conversations": [GOOD_TURN]}), '"id" must be a non-empty string (or an integer), got "" (a string)'),
    ("source not a string", _sample(source=["a"]), '"source" must be a string naming the dataset, got ["a"] (a list)'),
    ("answers not strings", _sample(answers=[1]), '"answers" must be a non-empty list of reference answer strings, got [1] (a list)'),
    ("missing conversations", json.dumps({"id": "x"}), 'missing "conversations"; add a list of turns like [{"user": "...", "assistant": "..."}]'),
    ("conversations not a list", json.dumps({"id": "x", "conversations": GOOD_TURN}), '"conversations" must be a list of turns, got {"images": ["good.png"], "user": "Wha... (an object)'),
    ("conversations empty", json.dumps({"id": "x", "conversations": []}), '"conversations" is empty; add at least one {"user": "...", "assistant": "..."} turn'),
    ("turn not an object", _turns(GOOD_TURN, "hello"), 'turn 2 must be an object like {"user": "...", "assistant": "..."}, got "hello" (a string)'),
    ("missing user", _turns({"assistant": "7"}), 'turn 1 is missing "user"; add the question or instruction'),
    ("user not a string", _turns({"user": 5, "assistant": "7"}), 'turn 1: "user" must be a string, got 5 (a number)'),
    ("missing assistant", _turns({"user": "Hi"}), 'turn 1 is missing "assistant"; training needs an answer in every turn'),
    ("empty assistant", _turns({"user": "Hi", "assistant": ""}), 'turn 1: "assistant" is empty; training needs an answer in every turn'),
    ("images not a list", _turns({"images": "good.png", "user": "Hi", "assistant": "7"}), 'turn 1: "images" must be a list of paths like ["a.jpg"], got "good.png" (a string)'),
    ("image path not a string", _turns({"images": ["good.png", 3], "user": "Hi", "assistant": "7"}), "turn 1: image 2 must be a non-empty path string, got 3 (a number)"),
    ("image path empty", _turns({"images": [""], "user": "Hi", "assistant": "7"}), 'turn 1: image 1 must be a non-empty path string, got "" (a string)'),
    ("unknown turn key typo", _turns({"user": "Hi", "asistant": "7"}), 'turn 1 has unknown key "asistant" (did you mean "assistant"?); allowed keys: "images", "user", "assistant", "frames"'),
    ("unknown turn key", _turns({"user": "Hi", "assistant": "7", "caption": "x"}), 'turn 1 has unknown key "caption"; allowed keys: "images", "user", "assistant", "frames"'),
    ("frames zero", _turns({"images": ["clip.mp4"], "frames": 0, "user": "Hi", "assistant": "7"}), 'turn 1: "frames" must be a positive integer (frames sampled per video), got 0 (a number)'),
    ("frames a string", _turns({"images": ["clip.mp4"], "frames": "8", "user": "Hi", "assistant": "7"}), 'turn 1: "frames" must be a positive integer (frames sampled per video), got "8" (a string)'),
    ("frames without video", _turns({"images": ["good.png"], "frames": 4, "user": "Hi", "assistant": "7"}), 'turn 1: "frames" is set but the turn lists no video file (.mp4, .avi, .mov, .mkv, .webm); remove it or add the video'),
    ("missing image", _turns({"images": ["good.png", "gone.png"], "user": "Hi", "assistant": "7"}), "turn 1: image 'gone.png' not found at {images}/gone.png; fix the path or add the file"),
    ("image is a folder", _turns({"images": ["folder.png"], "user": "Hi", "assistant": "7"}), "turn 1: image 'folder.png' is a folder, not a file: {images}/folder.png"),
    ("corrupt image", _turns({"images": ["corrupt.png"], "user": "Hi", "assistant": "7"}), "turn 1: image 'corrupt.png' cannot be decoded (not an image format PIL can read) at {images}/corrupt.png; replace or remove it"),
    ("truncated png", _turns({"images": ["truncated.png"], "user": "Hi", "assistant": "7"}), "turn 1: image 'truncated.png' cannot be decoded (image file is truncated) at {images}/truncated.png; replace or remove it"),
    ("zero-byte image", _turns({"images": ["empty.png"], "user": "Hi", "assistant": "7"}), "turn 1: image 'empty.png' is an empty file (0 bytes) at {images}/empty.png; re-export or remove it"),
    ("zero-width png", _turns({"images": ["zero-width.png"], "user": "Hi", "assistant": "7"}), "turn 1: image 'zero-width.png' cannot be decoded (not an image format PIL can read) at {images}/zero-width.png; replace or remove it"),
    ("tag number mismatch", _turns({"images": ["good.png"], "user": "<|image_2|>\nWhat?", "assistant": "7"}), "sample 'bad', turn 1: the text has image tags <|image_2|> but its 1 image(s) need <|image_1|> (tags are numbered across the whole conversation)"),
    ("duplicate tag", _turns({"images": ["good.png", "other.png"], "user": "<|image_1|><|image_1|> Same?", "assistant": "no"}), "sample 'bad', turn 1: image tag(s) <|image_1|> appear more than once"),
    ("tag without images", _turns({"user": "<|image_1|> Hi", "assistant": "7"}), "sample 'bad', turn 1: the text has image tags <|image_1|> but its 0 image(s) need no tags (the turn has no images) (tags are numbered across the whole conversation)"),
    ("tag restarts per turn", _turns(GOOD_TURN, {"images": ["other.png"], "user": "<|image_1|> And this?", "assistant": "3"}), "sample 'bad', turn 2: the text has image tags <|image_1|> but its 1 image(s) need <|image_2|> (tags are numbered across the whole conversation)"),
    ("tag ignores video frames", _turns({"images": ["clip.mp4"], "frames": 2, "user": "Go", "assistant": "a"}, {"images": ["good.png"], "user": "<|image_2|> This?", "assistant": "7"}), "sample 'bad', turn 2: the text has image tags <|image_2|> but its 1 image(s) need <|image_3|> (tags are numbered across the whole conversation)"),
    ("missing video", _turns({"images": ["gone.mp4"], "user": "Hi", "assistant": "7"}), "turn 1: video 'gone.mp4' not found at {images}/gone.mp4; fix the path or add the file"),
    ("video without decodable frames", _turns({"images": ["blank.avi"], "user": "Hi", "assistant": "7"}), "turn 1: video 'blank.avi' has no decodable frames at {images}/blank.avi; re-encode or remove it"),
    ("undecodable video", _turns({"images": ["broken.mp4"], "user": "Hi", "assistant": "7"}), "turn 1: video 'broken.mp4' cannot be opened as a video (Invalid data found when processing input) at {images}/broken.mp4; re-encode or remove it"),
]


def _write_jsonl(folder: Path, lines: list[str | bytes], name: str = "data.jsonl") -> Path:
    path = folder / name
    path.write_bytes(b"".join((line.encode() if isinstance(line, str) else line) + b"\n" for line in lines))
    return path


@pytest.mark.parametrize(("bad_line", "message"), [case[1:] for case in BAD_LINES], ids=[case[0] for case in BAD_LINES])
def test_each_bad_line_is_one_problem_with_its_file_and_line(media, bad_line, message):
    path = _write_jsonl(media, [_sample("first"), "", bad_line, _sample("last")])
    report = validate_file(path)
    expected = f"{path}:3: " + message.replace("{images}", str(media / "images"))
    assert report.problems == (expected,)
    assert (report.problem_count, report.samples, report.valid_samples) == (1, 3, 2)
    assert not report.clean


def test_the_bad_corpus_has_at_least_twenty_distinct_cases():
    assert len({case[1] for case in BAD_LINES}) == len(BAD_LINES) >= 20


def test_a_line_that_is_not_utf8_is_a_problem_not_a_crash(media):
    path = _write_jsonl(media, [_sample("a"), b'{"id": "caf\xe9"}', _sample("b")])
    report = validate_file(path)
    assert report.problems == (f"{path}:2: the line is not UTF-8 text (byte 12); re-save the file as UTF-8",)


def test_valid_media_of_every_kind_is_clean(media):
    video_turn = {"images": ["clip.mp4"], "frames": 2, "user": "What moves?", "assistant": "a square"}
    frames_turn = {"images": ["good.png", "other.png"], "user": "<|image_3|> <|image_4|> Same?", "assistant": "no"}
    lines = [
        _sample("single"),
        json.dumps({"id": 7, "conversations": [video_turn, frames_turn, {"user": "Sure?", "assistant": "yes"}]}),
        json.dumps({"id": "default-frames", "conversations": [{"images": ["clip.mp4"], "user": "Go", "assistant": "a"}]}),
    ]
    report = validate_file(_write_jsonl(media, lines))
    assert report.problems == ()
    assert report.clean
    assert (report.samples, report.valid_samples, report.turns) == (3, 3, 5)
    assert (report.images_mean, report.images_max) == (13 / 3, 8)


def test_blank_lines_are_skipped_and_problems_keep_real_line_numbers(media):
    path = _write_jsonl(media, ["", "   ", _sample("a"), "\t", "", '{"id": 1}', ""])
    report = validate_file(path)
    assert report.samples == 2
    assert report.problems == (
        f'{path}:6: missing "conversations"; add a list of turns like [{{"user": "...", "assistant": "..."}}]',
    )


def test_a_file_of_blank_lines_has_no_samples(media):
    path = _write_jsonl(media, ["", "  "])
    report = validate_file(path)
    assert report.problems == (f"{path}: the file has no samples (only blank lines); add one JSON object per line",)
    assert report.samples == 0


def test_duplicate_ids_are_problems_unless_allowed(media):
    path = _write_jsonl(media, [_sample("a"), _sample("b"), _sample("a"), _sample("a"), _sample("b")])
    first = f'{path}:3: duplicate id "a" (first at line 1); give every sample its own id (predictions are written per id)'
    report = validate_file(path)
    assert report.problems == (first, f'{path}:4: duplicate id "a" (first at line 1); give every sample its own id '
                               "(predictions are written per id)", first.replace(":3:", ":5:").replace('"a"', '"b"')
                               .replace("line 1", "line 2"))
    assert report.duplicate_ids == 3 and report.valid_samples == 2
    allowed = validate_file(path, allow_duplicate_ids=True)
    assert allowed.clean and allowed.duplicate_ids == 3
    assert f"  duplicate ids: 3 (allowed; first: {first})" in allowed.summary()


def test_missing_image_root_says_how_to_fix_it(media, tmp_path):
    path = _write_jsonl(media, [_sample("a")], name="elsewhere.jsonl")
    report = validate_file(path, image_root=tmp_path / "nowhere")
    assert report.problems == (
        f"{path}:1: turn 1: image 'good.png' not found at {tmp_path}/nowhere/good.png; the image root "
        f"{tmp_path}/nowhere does not exist: pass the folder the paths are relative to (--image-root)",
    )


def test_an_explicit_image_root_replaces_the_default(media, tmp_path):
    path = _write_jsonl(tmp_path, [_sample("a")])
    assert not validate_file(path).clean
    assert validate_file(path, image_root=media / "images").clean


def test_without_decoding_only_existence_and_size_are_checked(media):
    lines = [_turns({"images": [name], "user": "Hi", "assistant": "7"}) for name in ("corrupt.png", "empty.png", "broken.mp4")]
    report = validate_file(_write_jsonl(media, lines), decode_images=False, allow_duplicate_ids=True)
    assert report.problem_count == 1
    assert "turn 1: image 'empty.png' is an empty file (0 bytes)" in report.problems[0]


def _words(sample: Sample) -> int:
    return sum(len(turn.user.split()) + len(turn.assistant.split()) for turn in sample.turns)


def test_token_lengths_use_nearest_rank_percentiles(media):
    lines = [_turns({"user": " ".join(["w"] * n), "assistant": "x"}).replace('"bad"', f'"s{n}"') for n in range(1, 21)]
    report = validate_file(_write_jsonl(media, lines), token_counter=_words)
    assert (report.token_p50, report.token_p95, report.token_max) == (11, 20, 21)
    assert report.clean


def test_over_long_samples_are_problems_counted_in_the_summary(media):
    long_turn = {"user": "one two three four five", "assistant": "six"}
    path = _write_jsonl(media, [_sample("short"), json.dumps({"id": "long", "conversations": [long_turn]})])
    report = validate_file(path, token_counter=_words, max_length=5)
    assert report.problems == (
        f"{path}:2: sample 'long' is 6 tokens, over the max length 5; shorten its text, use fewer images or "
        "crops, or raise the max length",
    )
    assert (report.over_length, report.valid_samples) == (1, 1)
    assert "  over max length 5: 1" in report.summary()


def test_samples_with_other_problems_are_not_token_counted(media):
    counted = []
    path = _write_jsonl(media, [_sample("a"), _turns({"images": ["gone.png"], "user": "Hi", "assistant": "7"})])
    validate_file(path, token_counter=lambda sample: counted.append(sample.id) or 3)
    assert counted == ["a"]


def test_max_length_without_a_token_counter_is_refused(media):
    with pytest.raises(PhivisionError, match="max_length needs a token counter"):
        validate_file(_write_jsonl(media, [_sample("a")]), max_length=10)


def test_problems_are_capped_but_all_counted(media):
    path = _write_jsonl(media, [json.dumps({"id": f"x{i}"}) for i in range(5)])
    report = validate_file(path, max_problems=3)
    assert [problem.split(": ")[0] for problem in report.problems] == [f"{path}:{i}" for i in (1, 2, 3)]
    assert report.problem_count == 5


def test_summary_text(media):
    path = _write_jsonl(media, [_sample("a"), _sample("b", conversations=[GOOD_TURN, GOOD_TURN]), "[]"])
    report = validate_file(path)
    assert report.summary() == "\n".join(
        [
            f"{path}",
            "  samples: 3 (2 valid, 1 with problems)",
            "  problems: 1",
            "  turns: 3",
            "  images per sample: mean 1.50, max 2",
            "  duplicate ids: 0",
            "  tokens per sample: not counted (needs a model folder: --model)",
            "FAILED: 1 problem(s)",
        ]
    )


def _run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    validate_cli.add_arguments(parser)
    return validate_cli.run(parser.parse_args(argv))


def test_cli_exits_0_on_a_clean_file_and_prints_the_summary(media, capsys):
    path = _write_jsonl(media, [_sample("a"), _sample("b")])
    assert _run_cli(str(path)) == 0
    output = capsys.readouterr().out
    assert output.startswith(f"{path}\n  samples: 2 (2 valid, 0 with problems)\n")
    assert output.endswith("OK: no problems found\n")


def test_cli_exits_1_and_prints_capped_problems_before_the_summary(media, capsys):
    path = _write_jsonl(media, [json.dumps({"id": f"x{i}"}) for i in range(4)] + [_sample("ok")])
    assert _run_cli(str(path), "--max-problems", "2") == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f'{path}:1: missing "conversations"; add a list of turns like [{{"user": "...", "assistant": "..."}}]'
    assert lines[1].startswith(f"{path}:2: missing")
    assert lines[2] == "... and 2 more problems"
    assert lines[3:5] == [f"{path}", "  samples: 5 (1 valid, 4 with problems)"]
    assert lines[-1] == "FAILED: 4 problem(s)"


def test_cli_image_root_and_no_decode_flags(media, tmp_path, capsys):
    path = _write_jsonl(tmp_path, [_turns({"images": ["corrupt.png"], "user": "Hi", "assistant": "7"})])
    assert _run_cli(str(path), "--image-root", str(media / "images")) == 1
    assert _run_cli(str(path), "--image-root", str(media / "images"), "--no-decode") == 0


def test_cli_errors_exit_2_through_the_main_entry_point(media, tmp_path, capsys):
    from phivision.cli.main import main

    assert main(["validate", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err == f"phivision validate: error: {tmp_path}/missing.jsonl: no such jsonl file; check the path\n"
    assert main(["validate", str(_write_jsonl(media, [_sample("a")])), "--max-length", "9"]) == 2
    assert "needs a model folder: add --model DIR" in capsys.readouterr().err


def test_ten_thousand_lines_with_images_validate_quickly(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for index in range(2000):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{index}.png")
    lines = [
        json.dumps({"id": f"s{i}", "conversations": [{"images": [f"{i % 2000}.png"], "user": "Digit?", "assistant": "3"}]})
        for i in range(10_000)
    ]
    path = _write_jsonl(tmp_path, lines)
    start = time.perf_counter()
    report = validate_file(path)
    elapsed = time.perf_counter() - start
    print(f"validated 10,000 lines / 2,000 images in {elapsed:.2f} s")
    assert (report.samples, report.valid_samples, report.problem_count) == (10_000, 10_000, 0)
    assert elapsed < 60
