"""Inputs mean what they say: every image mode, control-token text, duplicate ids, crops, tokenizer files."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import phivision_in_process
from PIL import Image

from phivision.cli.main import main
from phivision.errors import PhivisionError
from phivision.processing.images import CLIP_MEAN, CLIP_STD, hd_transform, load_image
from phivision.processing.processor import Phi3VProcessor

# ---- image modes ---------------------------------------------------------------------------


def _row(mode: str, values) -> Image.Image:
    """A 1-pixel-high image of the given pixels."""
    image = Image.new(mode, (len(values), 1))
    image.putdata(values)
    return image


def _palette(with_transparency: bool) -> tuple[Image.Image, dict]:
    image = _row("P", [0, 1, 1, 1])
    image.putpalette([255, 0, 0, 0, 0, 255])
    return image, ({"transparency": 1} if with_transparency else {})


# (file name, image, save options, expected per-channel mean after load_image)
MODES = {
    "1": ("one.png", _row("1", [255, 0, 255, 0]), {}, (127.5, 127.5, 127.5)),
    "L": ("l.png", _row("L", [0, 100, 200, 60]), {}, (90.0, 90.0, 90.0)),
    # Transparent pixels (alpha 0) become white, opaque ones keep their value.
    "LA": ("la.png", _row("LA", [(0, 255), (100, 255), (200, 0), (60, 0)]), {}, (152.5, 152.5, 152.5)),
    "P": ("p.png", *_palette(False), (63.75, 0.0, 191.25)),
    "P-transparency": ("pt.png", *_palette(True), (255.0, 191.25, 191.25)),
    # A tRNS key colour: pixels of exactly that colour are transparent, hence white.
    "RGB-tRNS": ("rgbt.png", _row("RGB", [(1, 2, 3), (10, 20, 30)]), {"transparency": (1, 2, 3)},
                 (132.5, 137.5, 142.5)),
    "RGBA": ("rgba.png", _row("RGBA", [(10, 20, 30, 255), (0, 0, 0, 0)]), {}, (132.5, 137.5, 142.5)),
    "CMYK": ("cmyk.tif", _row("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0)]), {}, (127.5, 255.0, 255.0)),
    # 16 bits scale by 1/257: 65535 -> 255, 25700 -> 100, 32768 -> 127.5 rounded to 128.
    "I;16": ("i16.png", Image.fromarray(np.array([[0, 65535, 25700, 32768]], np.uint16)), {},
             (120.75,) * 3),
    # A grey tRNS key: the 0 pixel is transparent, hence white (8 and 16 bits alike).
    "L-tRNS": ("lt.png", _row("L", [0, 100, 200, 60]), {"transparency": 0}, (153.75,) * 3),
    "I;16-tRNS": ("i16t.png", Image.fromarray(np.array([[0, 65535, 25700, 32768]], np.uint16)), {"transparency": 0},
                  (184.5,) * 3),
    "I": ("i.tif", Image.fromarray(np.array([[0, 65535, 25700, 32768]], np.int32)), {}, (120.75,) * 3),
    # I outside 0..65535: min-max, -100 -> 0, 0 -> 63.75 -> 64, 100 -> 127.5 -> 128, 300 -> 255.
    "I-minmax": ("im.tif", Image.fromarray(np.array([[-100, 0, 100, 300]], np.int32)), {}, (111.75,) * 3),
    # F within 0..1 times 255: 0.5 -> 127.5 -> 128, 0.2 -> 51.
    "F": ("f.tif", Image.fromarray(np.array([[0.0, 1.0, 0.5, 0.2]], np.float32)), {}, (108.5,) * 3),
    "F-minmax": ("fm.tif", Image.fromarray(np.array([[0.0, 10.0, 20.0, 40.0]], np.float32)), {}, (111.75,) * 3),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_image_mode_loads_as_the_pixels_written(tmp_path, mode):
    name, image, options, expected = MODES[mode]
    image.save(tmp_path / name, **options)
    with Image.open(tmp_path / name) as written:
        assert written.mode == image.mode  # the file really has the mode under test
    rgb = load_image(tmp_path / name)
    assert rgb.mode == "RGB"
    assert tuple(np.asarray(rgb, np.float64).mean(axis=(0, 1))) == expected


def _seen_pixels(pixel_values, image_size, crop_size):
    """The HD tiles' pixels back in 0..255 (the tiles hold the image and its white padding)."""
    rows, cols = image_size[0] // crop_size, image_size[1] // crop_size
    tiles = pixel_values[1 : 1 + rows * cols].numpy().astype(np.float64)
    mean, std = np.array(CLIP_MEAN).reshape(1, 3, 1, 1), np.array(CLIP_STD).reshape(1, 3, 1, 1)
    return (tiles * std + mean) * 255.0


def test_a_16_bit_scan_trains_as_its_grey_ramp_not_as_white(tmp_path):
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # true mean 127.5 of 255
    Image.fromarray(ramp).save(tmp_path / "scan.png")
    image = load_image(tmp_path / "scan.png")
    assert np.asarray(image, np.float64).mean() == 127.5
    assert (np.asarray(image) == 255).mean() < 0.01
    # Square, so one 336 tile holds the whole (bilinearly resized) image: its mean stays ~127.5.
    pixel_values, size = hd_transform(image, num_crops=1, crop_size=336)
    assert abs(_seen_pixels(pixel_values, size, 336).mean() - 127.5) < 0.5


def test_an_rgb_png_with_a_key_colour_is_composited_through_the_hd_transform(tmp_path):
    pixels = np.zeros((336, 336, 3), np.uint8)
    pixels[:, 168:] = (1, 2, 3)  # the right half is the key colour: transparent
    Image.fromarray(pixels).save(tmp_path / "keyed.png", transparency=(1, 2, 3))
    pixel_values, size = hd_transform(load_image(tmp_path / "keyed.png"), num_crops=1, crop_size=336)
    seen = _seen_pixels(pixel_values, size, 336)
    assert np.allclose(seen[..., :168], 0.0, atol=1e-3)
    assert np.allclose(seen[..., 168:], 255.0, atol=1e-3)


def test_a_float_image_with_nan_is_refused_naming_the_file(tmp_path):
    from phivision.data.validate import validate_file

    (tmp_path / "images").mkdir()
    Image.fromarray(np.array([[0.0, np.nan]], np.float32)).save(tmp_path / "images" / "nan.tif")
    with pytest.raises(PhivisionError, match=r"nan\.tif.*NaN"):
        load_image(tmp_path / "images" / "nan.tif")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "a", "conversations": [{"images": ["nan.tif"], "user": "Q", "assistant": "A"}]}))
    [problem] = validate_file(data).problems
    assert problem.startswith(f"{data}:1: turn 1: image 'nan.tif' cannot be used: ") and "NaN" in problem


# ---- duplicate ids -------------------------------------------------------------------------


def _dataset(folder: Path, ids: list[str], user: str = "What digit is this?", answer: str = "7") -> Path:
    """A jsonl whose samples all show one real image, one sample per id."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(folder / "images" / "a.png")
    lines = [json.dumps({"id": sample_id, "conversations": [{"images": ["a.png"], "user": user, "assistant": answer}]})
             for sample_id in ids]
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_validate_fails_on_a_duplicate_id_naming_both_lines(tmp_path, capfd):
    data = _dataset(tmp_path, ["a", "b", "a"])
    completed = phivision_in_process(capfd, "validate", str(data))
    assert completed.returncode == 1
    assert f'{data}:3: duplicate id "a" (first at line 1)' in completed.stdout
    assert "FAILED: 1 problem(s)" in completed.stdout and "Traceback" not in completed.stderr
    allowed = phivision_in_process(capfd, "validate", str(data), "--allow-duplicate-ids")
    assert allowed.returncode == 0, allowed.stdout
    assert "duplicate ids: 1 (allowed; first:" in allowed.stdout


def test_training_and_eval_refuse_duplicate_ids_up_front(tmp_path, tiny_processor, capfd):
    from phivision.data.dataset import check_dataset

    data = _dataset(tmp_path, ["a", "b", "a"])
    with pytest.raises(PhivisionError, match=re.escape(f'{data}:3: duplicate id "a" (first at line 1)')):
        check_dataset(data, tiny_processor)
    assert check_dataset(data, tiny_processor, skip_invalid=True).indices == [0, 1]
    completed = phivision_in_process(capfd, "eval", "--model", "no-model-needed", "--data", str(data))
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert completed.stderr.startswith(f'phivision eval: error: {data}:3: duplicate id "a" (first at line 1)')
    assert "--allow-duplicate-ids" in completed.stderr


# ---- crops ---------------------------------------------------------------------------------


@pytest.fixture()
def generate_spy(monkeypatch):
    """`crops` and `prompts` of every `generate` call; answers are empty."""
    from types import SimpleNamespace

    from phivision.evaluate import generate as generate_module

    calls = SimpleNamespace(crops=[], prompts=[])

    def spy(model, processor, prompts, max_new_tokens=64, streamer=None):
        calls.crops.append(processor.num_crops)
        calls.prompts.extend(prompts)
        return [""] * len(prompts)

    monkeypatch.setattr(generate_module, "generate", spy)
    return calls


def _with_crops(folder: Path, source: Path, num_crops: int) -> Path:
    shutil.copytree(source, folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, "num_crops": num_crops}))
    return folder


def test_predict_and_eval_use_the_crops_the_model_folder_records(tmp_path, tiny_model_dir, generate_spy):
    model = _with_crops(tmp_path / "model", tiny_model_dir, 3)
    data = _dataset(tmp_path / "data", ["a"])
    image = str(data.parent / "images" / "a.png")
    assert main(["predict", "--model", str(model), "--image", image, "--prompt", "What?", "--max-new-tokens", "1"]) == 0
    assert main(["eval", "--model", str(model), "--data", str(data), "--max-new-tokens", "1"]) == 0
    assert main(["predict", "--model", str(model), "--image", image, "--prompt", "What?", "--num-crops", "2"]) == 0
    assert generate_spy.crops == [3, 3, 2]


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_help_shows_every_default(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    parser = argparse.ArgumentParser()
    module = importlib.import_module(f"phivision.cli.{command}")
    module.add_arguments(parser)
    for action in parser._actions:
        if action.option_strings and not action.required and action.dest != "help":
            shown = "default" in (action.help or "") or isinstance(action, argparse._StoreTrueAction)
            assert shown, f"{command} {action.option_strings[0]} does not say its default"
    assert "the adapter folder's preprocessor_config.json, else the model folder's" in text


# ---- control tokens written in data text -----------------------------------------------------

QUESTION, ANSWER = "Is <|end|> a token?", "No <|endoftext|> <|user|>"
# <s> <|user|> "\n" "Is" "<|end|>" as the five characters "a token?" <|end|> "\n" <|assistant|> "\n"
PROMPT_IDS = [1, 32010, 29871, 13, 3624, 529, 29989, 355, 29989, 29958, 263, 5993, 29973, 32007, 29871, 13,
              32001, 29871, 13]
# "No" "<|endoftext|>" and "<|user|>" as text, then the template's <|end|> "\n" <|endoftext|>
# The same question after an image tag: the image ids sit between "<|user|>\n" and a second <s>.
WITH_IMAGE = [1, 32010, 29871, 13, 1, 29871, 13]
ANSWER_IDS = [1939, 529, 29989, 355, 974, 726, 29989, 29958, 529, 29989, 1792, 29989, 29958, 32007, 29871, 13, 32000]


def test_control_tokens_in_training_text_are_text(tmp_path, tiny_processor):
    from phivision.data.dataset import ConversationDataset

    data = _dataset(tmp_path, ["a"], user=QUESTION, answer=ANSWER)
    encoded = ConversationDataset(data, tiny_processor)[0]
    text_ids = encoded.input_ids[encoded.input_ids >= 0].tolist()
    assert text_ids == WITH_IMAGE + PROMPT_IDS[4:] + ANSWER_IDS
    assert encoded.labels[-len(ANSWER_IDS):].tolist() == ANSWER_IDS
    # Only the template's control tokens: one <|user|>, <|end|> after the question and the answer, one <|endoftext|>.
    assert [text_ids.count(token) for token in (32010, 32007, 32001, 32000)] == [1, 2, 1, 1]


def test_control_tokens_in_text_only_turns_keep_exact_ids(tiny_processor):
    input_ids, labels = tiny_processor.conversation_ids("s", [(QUESTION, ANSWER, 0)], [])
    assert input_ids == PROMPT_IDS + ANSWER_IDS
    assert labels == [-100] * len(PROMPT_IDS) + ANSWER_IDS


def test_control_tokens_in_a_predict_prompt_and_eval_data_are_text(tmp_path, tiny_model_dir, generate_spy):
    data = _dataset(tmp_path, ["a"], user=QUESTION)
    image = str(data.parent / "images" / "a.png")
    assert main(["predict", "--model", str(tiny_model_dir), "--image", image, "--prompt", QUESTION]) == 0
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data)]) == 0
    for prompt in generate_spy.prompts:
        text_ids = prompt.input_ids[prompt.input_ids >= 0].tolist()
        assert text_ids == WITH_IMAGE + PROMPT_IDS[4:]
        assert [text_ids.count(token) for token in (32010, 32007, 32001, 32000)] == [1, 1, 1, 0]


# ---- tokenizer_config.json flags -----------------------------------------------------------

FLAG_TEXT = "<|user|>\nWhat is it? <|end|>\n<|assistant|>\nA cat.  <|end|>\n<|endoftext|>"


def _tokenizer_folder(folder: Path, rstrip_end: bool) -> Path:
    """The bundled tokenizer.json with a tokenizer_config.json listing every added token, as checkpoints do."""
    from phivision.processing.tokenizer import bundled_tokenizer_path

    folder.mkdir()
    shutil.copyfile(bundled_tokenizer_path(), folder / "tokenizer.json")
    added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    decoder = {str(token.pop("id")): token for token in added}
    decoder["32007"]["rstrip"] = rstrip_end
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "<|endoftext|>",
              "unk_token": "<unk>", "pad_token": "<|endoftext|>", "add_bos_token": False, "legacy": False,
              "added_tokens_decoder": decoder}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_tokenizer_config_flags_give_the_ids_transformers_gives(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from phivision.processing.tokenizer import Phi3Tokenizer

    folder = _tokenizer_folder(tmp_path / "rstrip", rstrip_end=True)
    ours = Phi3Tokenizer.from_folder(folder)
    expected = [32010, 29871, 13, 5618, 338, 372, 29973, 29871, 32007, 32001, 29871, 13, 29909, 6635, 29889, 259,
                32007, 32000]  # rstrip: <|end|> swallows the "\n" after it
    assert ours.encode(FLAG_TEXT) == expected
    # PreTrainedTokenizerFast reads tokenizer.json as written, as phivision does. (AutoTokenizer, for
    # tokenizer_class LlamaTokenizer, rebuilds the pre-tokenizer under transformers 5.x and drops the
    # 29871 after control tokens that the checkpoint's tokenizer.json produces.)
    assert PreTrainedTokenizerFast.from_pretrained(folder).encode(FLAG_TEXT, add_special_tokens=False) == expected
    # The chat template honours it too: no "\n" token after the template's <|end|>. (The answer is
    # tokenised on its own, as the official recipe does: "A" gets the leading space, 319.)
    input_ids, _ = Phi3VProcessor(ours).conversation_ids("s", [("What is it? ", "A cat.  ", 0)], [])
    assert input_ids == [1, *expected[:12], 319, 6635, 29889, 259, 32007, 32000]
    plain = Phi3Tokenizer.from_folder(_tokenizer_folder(tmp_path / "plain", rstrip_end=False))
    assert plain.encode(FLAG_TEXT) == PreTrainedTokenizerFast.from_pretrained(tmp_path / "plain").encode(
        FLAG_TEXT, add_special_tokens=False) != expected
