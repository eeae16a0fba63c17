"""The processor against the official rules: token counts, pixel values, prompt ids, labels, errors.

Expected values are worked out by hand from the official Phi-3.5-vision processor rules and written
as literals, so a change in the code under test cannot silently move them.
"""

from __future__ import annotations

import io
import json
import shutil
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from phivision.data.collate import left_padded_prompts
from phivision.errors import PhivisionError
from phivision.model.vision import num_image_tokens
from phivision.processing.images import crop_grid, hd_transform, load_image
from phivision.processing.processor import ChatTurn, Phi3VProcessor
from phivision.processing.tokenizer import Phi3Tokenizer

OFFICIAL_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
OFFICIAL_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

# "<|user|>\n" with its BOS, and the text after an image tag up to the generation prompt.
BOS_USER = [1, 32010, 29871, 13]
WHAT_IS_THIS = [1, 29871, 13, 5618, 338, 445, 29973, 32007, 29871, 13, 32001, 29871, 13]
AND_THIS_ONE = [1, 29871, 13, 2855, 445, 697, 29973, 32007, 29871, 13, 32001, 29871, 13]
A_CAT = [29909, 6635, 29889, 32007, 29871, 13]  # an earlier answer: "A" continues the prompt text
A_DOG_LAST = [319, 11203, 29889, 32007, 29871, 13, 32000]


@pytest.fixture(scope="module")
def tokenizer():
    return Phi3Tokenizer.bundled()


def official_processor(tokenizer, num_crops: int) -> Phi3VProcessor:
    """The official geometry: 336 px crops, 12x12 merged features per crop."""
    return Phi3VProcessor(tokenizer, num_crops=num_crops, crop_size=336, merged_grid=12)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def pattern(height: int, width: int) -> np.ndarray:
    """Distinct, known uint8 pixels: every position and channel differs from its neighbours."""
    return ((np.arange(height * width * 3).reshape(height, width, 3) * 7 + 3) % 256).astype(np.uint8)


def normalised_chw(canvas: np.ndarray) -> np.ndarray:
    """ToTensor + Normalize of the official processor, written out: (x / 255 - mean) / std."""
    scaled = canvas.astype(np.float32) / np.float32(255.0)
    return ((scaled - OFFICIAL_MEAN) / OFFICIAL_STD).transpose(2, 0, 1)


def bicubic(chw: np.ndarray, size: int) -> torch.Tensor:
    """The global view: bicubic resize (align_corners=False) of the normalised HD image."""
    batch = torch.from_numpy(np.ascontiguousarray(chw))[None]
    return F.interpolate(batch, size=(size, size), mode="bicubic", align_corners=False)[0]


def assert_pixels(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected), rtol=0, atol=1e-6)


# ---- token counts at the official geometry ----------------------------------------------------


@pytest.mark.parametrize("num_crops, grid, size, tokens", [(16, 4, 1344, 2509), (4, 2, 672, 757), (1, 1, 336, 313)])
def test_square_image_token_count(tokenizer, num_crops, grid, size, tokens):
    processor = official_processor(tokenizer, num_crops)
    pixel_values, image_sizes, counts = processor.process_images([noise_image(64, 64)])
    assert crop_grid(64, 64, num_crops, 336) == (grid, grid)
    assert num_image_tokens(grid, grid, 12) == tokens
    assert counts == [tokens]
    assert image_sizes.tolist() == [[size, size]]
    assert pixel_values.shape == (1, num_crops + 1, 3, 336, 336)


@pytest.mark.parametrize(
    "width, height, grid, size, tokens",
    [(1000, 500, (3, 5), (1008, 1680), 2353), (500, 1000, (5, 3), (1680, 1008), 2377)],
)
def test_elongated_image_geometry(tokenizer, width, height, grid, size, tokens):
    """ratio 2 at N=16: scale 5 (5 * ceil(5/2) = 15), 1680 x 840 padded to 1008; portrait transposed."""
    processor = official_processor(tokenizer, 16)
    pixel_values, image_sizes, counts = processor.process_images([noise_image(width, height)])
    assert crop_grid(width, height, 16, 336) == grid
    assert image_sizes.tolist() == [list(size)]
    assert counts == [tokens]
    assert processor.image_token_count(width, height) == tokens
    assert pixel_values[0, 16].abs().sum() == 0  # 15 tiles used, slot 16 is a zero crop


def test_official_call_layout(tokenizer):
    """`processor(prompt, images)` as the official processor: BOS per text chunk, -1 per image token."""
    processor = official_processor(tokenizer, 1)
    prompt = "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n"
    output = processor(prompt, [noise_image(300, 200)])
    assert output["input_ids"].tolist() == [BOS_USER + [-1] * 313 + WHAT_IS_THIS]
    assert output["attention_mask"].tolist() == [[1] * (4 + 313 + 13)]
    assert output["image_sizes"].tolist() == [[336, 336]]


# ---- pixel values against hand arithmetic -----------------------------------------------------


def test_landscape_white_padding_and_normalisation():
    """16x5 at crop 8, N=2: scale 2, no resize, 3 white rows split 1 above / 2 below."""
    pixels = pattern(5, 16)
    pixel_values, size = hd_transform(Image.fromarray(pixels), num_crops=2, crop_size=8)
    canvas = np.full((8, 16, 3), 255, dtype=np.uint8)
    canvas[1:6] = pixels
    hd = normalised_chw(canvas)
    assert size == (8, 16)
    assert pixel_values.shape == (3, 3, 8, 8)
    assert_pixels(pixel_values[1], hd[:, :, 0:8])
    assert_pixels(pixel_values[2], hd[:, :, 8:16])
    assert_pixels(pixel_values[0], bicubic(hd, 8))
    white = (1.0 - OFFICIAL_MEAN) / OFFICIAL_STD
    assert_pixels(pixel_values[1, :, 0, 0], white)
    assert_pixels(pixel_values[1, :, 7, 0], white)


def test_tiles_row_major_and_zero_tiles():
    """8x8 at crop 4, N=5: 2x2 tiles (TL, TR, BL, BR), then one zero crop; global view bicubic 8 -> 4."""
    pixels = pattern(8, 8)
    pixel_values, size = hd_transform(Image.fromarray(pixels), num_crops=5, crop_size=4)
    hd = normalised_chw(pixels)
    assert size == (8, 8)
    assert pixel_values.shape == (6, 3, 4, 4)
    assert_pixels(pixel_values[1], hd[:, 0:4, 0:4])
    assert_pixels(pixel_values[2], hd[:, 0:4, 4:8])
    assert_pixels(pixel_values[3], hd[:, 4:8, 0:4])
    assert_pixels(pixel_values[4], hd[:, 4:8, 4:8])
    assert_pixels(pixel_values[5], np.zeros((3, 4, 4), dtype=np.float32))
    assert_pixels(pixel_values[0], bicubic(hd, 4))


def test_portrait_is_transposed_and_back():
    """5 wide x 16 high at crop 8, N=2: padded left 1 / right 2, tiles top then bottom."""
    pixels = pattern(16, 5)
    pixel_values, size = hd_transform(Image.fromarray(pixels), num_crops=2, crop_size=8)
    canvas = np.full((16, 8, 3), 255, dtype=np.uint8)
    canvas[:, 1:6] = pixels
    hd = normalised_chw(canvas)
    assert size == (16, 8)
    assert_pixels(pixel_values[1], hd[:, 0:8])
    assert_pixels(pixel_values[2], hd[:, 8:16])
    assert_pixels(pixel_values[0], bicubic(hd, 8))


# ---- conversations ------------------------------------------------------------------------------


@pytest.fixture()
def two_images():
    """Square -> 2x2 grid, 27 tokens; 112x40 -> 1x2 grid, 17 tokens (crop 56, merged grid 2, N=4)."""
    return noise_image(60, 60, seed=1), noise_image(112, 40, seed=2)


def two_turns(images, last_answer: str | None = "A dog.") -> list[ChatTurn]:
    square, wide = images
    return [
        ChatTurn("What is this?", "A cat.", [square]),
        ChatTurn("<|image_2|>\nAnd this one?", last_answer, [wide]),
    ]


FIRST_PROMPT = BOS_USER + [-1] * 27 + WHAT_IS_THIS
SECOND_PROMPT = [32010, 29871, 13] + [-2] * 17 + AND_THIS_ONE


def test_two_turn_two_image_conversation(tiny_processor, two_images):
    encoded = tiny_processor.encode_conversation("chat-1", two_turns(two_images))
    assert encoded.input_ids.tolist() == FIRST_PROMPT + A_CAT + SECOND_PROMPT + A_DOG_LAST
    assert encoded.labels.tolist() == [-100] * 44 + A_CAT + [-100] * 33 + A_DOG_LAST
    assert encoded.image_sizes.tolist() == [[112, 112], [56, 112]]
    assert encoded.pixel_values.shape == (2, 5, 3, 56, 56)


def test_earlier_answers_have_the_ids_of_the_same_conversation_as_an_inference_prompt(tiny_processor, two_images):
    """The official processor tokenises the whole prompt text: the model sees "A" (29909), not "▁A" (319)."""
    text = ("<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\nA cat.<|end|>\n"
            "<|user|>\n<|image_2|>\nAnd this one?<|end|>\n<|assistant|>\n")
    expected = tiny_processor(text, list(two_images))["input_ids"][0].tolist()
    prompt = tiny_processor.encode_conversation("chat-1", two_turns(two_images, None), for_generation=True)
    assert prompt.input_ids.tolist() == expected
    trained = tiny_processor.encode_conversation("chat-1", two_turns(two_images))
    assert trained.input_ids.tolist() == expected + A_DOG_LAST
    history = expected.index(29909)
    assert expected[history - 3 : history + 1] == [32001, 29871, 13, 29909]
    assert trained.labels.tolist() == ([-100] * history + expected[history : history + len(A_CAT)]
                                       + [-100] * (len(expected) - history - len(A_CAT)) + A_DOG_LAST)


def test_train_on_last_answer_only(tiny_processor, two_images):
    encoded = tiny_processor.encode_conversation("chat-1", two_turns(two_images), train_on="last")
    assert encoded.input_ids.tolist() == FIRST_PROMPT + A_CAT + SECOND_PROMPT + A_DOG_LAST
    assert encoded.labels.tolist() == [-100] * (44 + 6 + 33) + A_DOG_LAST


def test_generation_prompt(tiny_processor, two_images):
    encoded = tiny_processor.encode_conversation("chat-1", two_turns(two_images, None), for_generation=True)
    assert encoded.input_ids.tolist() == FIRST_PROMPT + A_CAT + SECOND_PROMPT
    assert encoded.input_ids[-3:].tolist() == [32001, 29871, 13]


def test_left_padded_batch_rows_equal_unbatched(tiny_processor, two_images):
    square, wide = two_images
    long = tiny_processor.encode_conversation("a", two_turns(two_images, None), for_generation=True)
    short = tiny_processor.encode_conversation("b", [ChatTurn("What is this?", images=[wide])], for_generation=True)
    assert short.input_ids.tolist() == BOS_USER + [-1] * 17 + WHAT_IS_THIS
    batch = left_padded_prompts([long, short], pad_id=32000, crop_size=56)
    width = len(long)
    padding = width - len(short)
    assert batch["input_ids"][0].tolist() == long.input_ids.tolist()
    assert batch["input_ids"][1].tolist() == [32000] * padding + short.input_ids.tolist()
    assert batch["attention_mask"].tolist() == [[1] * width, [0] * padding + [1] * len(short)]
    unbatched = torch.cat([long.pixel_values, short.pixel_values])
    assert torch.equal(batch["pixel_values"], unbatched)  # every slot used by the 2x2 image
    assert batch["image_sizes"].tolist() == [[112, 112], [56, 112], [56, 112]]


@pytest.mark.parametrize(
    "turns",
    [
        pytest.param([("<|image_2|>\nWhat?", 1)], id="wrong-number"),
        pytest.param([("<|image_1|>\nCompare them.", 2)], id="missing-tag"),
        pytest.param([("<|image_1|>\n<|image_1|>\nWhat?", 1)], id="duplicate"),
        pytest.param([("What?", 1), ("<|image_1|>\nAgain?", 0)], id="tag-without-image"),
        pytest.param([("<|image_1|>\nWhat?", 1), ("<|image_1|>\nAnd this?", 1)], id="numbering-restarted"),
    ],
)
def test_tag_errors_name_the_sample(tiny_processor, turns):
    chat = [ChatTurn(text, "yes", [noise_image(60, 60)] * count) for text, count in turns]
    with pytest.raises(PhivisionError, match="doc-17"):
        tiny_processor.encode_conversation("doc-17", chat)


# ---- bad settings and files ---------------------------------------------------------------------


def test_num_crops_below_one_is_rejected(tiny_processor, tiny_model_dir, tokenizer, two_images):
    turn = [ChatTurn("What is this?", "A cat.", [two_images[0]])]
    with pytest.raises(PhivisionError, match="num_crops"):
        Phi3VProcessor(tokenizer, num_crops=0)
    with pytest.raises(PhivisionError, match="num_crops"):
        Phi3VProcessor.from_pretrained(tiny_model_dir, num_crops=0)
    with pytest.raises(PhivisionError, match="num_crops"):
        tiny_processor.encode_conversation("s", turn, num_crops=0)
    with pytest.raises(PhivisionError, match="num_crops"):
        tiny_processor.process_images([two_images[0]], num_crops=-1)
    with pytest.raises(PhivisionError, match="num_crops"):
        crop_grid(100, 100, 0, 56)


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    noise_image(64, 64).save(buffer, format="JPEG")
    return buffer.getvalue()[: buffer.tell() // 2]


@pytest.mark.parametrize(
    "name, content",
    [
        ("noise.jpg", np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        ("empty.png", b""),
        ("cut.jpg", truncated_jpeg()),
    ],
)
def test_unreadable_image_gives_one_clear_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PhivisionError, match=name) as caught:
        load_image(path)
    error = caught.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)  # no chained traceback


def test_missing_image_names_the_file(tmp_path):
    with pytest.raises(PhivisionError, match="absent.png"):
        load_image(tmp_path / "absent.png")


# ---- folders ------------------------------------------------------------------------------------


def model_folder(tiny_model_dir, destination):
    """A folder with the tiny model's config.json only (geometry), for processor files to go in."""
    destination.mkdir()
    shutil.copyfile(tiny_model_dir / "config.json", destination / "config.json")
    return destination


def test_save_and_load_round_trip(tiny_model_dir, tmp_path, two_images):
    folder = model_folder(tiny_model_dir, tmp_path / "saved")
    original = Phi3VProcessor(
        Phi3Tokenizer.from_folder(tiny_model_dir), num_crops=9, crop_size=56, merged_grid=2,
        image_mean=(0.5, 0.25, 0.125), image_std=(0.2, 0.3, 0.4),
    )
    original.save_pretrained(folder)
    written = json.loads((folder / "preprocessor_config.json").read_text())
    assert written["num_crops"] == 9
    assert written["image_processor_type"] == "Phi3VImageProcessor"
    assert written["processor_class"] == "Phi3VProcessor"
    loaded = Phi3VProcessor.from_pretrained(folder)
    assert (loaded.num_crops, loaded.crop_size, loaded.merged_grid) == (9, 56, 2)
    assert loaded.image_mean == (0.5, 0.25, 0.125)
    assert loaded.image_std == (0.2, 0.3, 0.4)
    turns = two_turns(two_images)
    before = original.encode_conversation("x", turns)
    after = loaded.encode_conversation("x", turns)
    assert torch.equal(before.input_ids, after.input_ids)
    assert torch.equal(before.pixel_values, after.pixel_values)


def test_official_preprocessor_config_is_read(tiny_model_dir, tmp_path):
    folder = model_folder(tiny_model_dir, tmp_path / "official")
    shutil.copyfile(tiny_model_dir / "tokenizer.json", folder / "tokenizer.json")
    official = {
        "auto_map": {
            "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
            "AutoImageProcessor": "processing_phi3_v.Phi3VImageProcessor",
        },
        "num_crops": 16,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "Phi3VImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "processor_class": "Phi3VProcessor",
        "num_img_tokens": 144,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(official))
    processor = Phi3VProcessor.from_pretrained(folder)
    assert processor.num_crops == 16
    assert processor.image_mean == (0.48145466, 0.4578275, 0.40821073)
    assert processor.image_std == (0.26862954, 0.26130258, 0.27577711)
    assert Phi3VProcessor.from_pretrained(folder, num_crops=4).num_crops == 4
    processor.save_pretrained(folder)
    assert json.loads((folder / "preprocessor_config.json").read_text())["auto_map"] == official["auto_map"]


# ---- speed --------------------------------------------------------------------------------------


def test_processing_speed(tokenizer):
    """Micro-benchmark: prints images/s for 16 images of 1024x768 at N=16, 336 px (no speed assert)."""
    processor = official_processor(tokenizer, 16)
    images = [noise_image(1024, 768, seed=seed) for seed in range(16)]
    start = time.perf_counter()
    pixel_values, image_sizes, counts = processor.process_images(images)
    elapsed = time.perf_counter() - start
    print(f"\nHD transform: {len(images) / elapsed:.1f} images/s (16 images 1024x768, N=16, 336 px)")
    assert pixel_values.shape == (16, 17, 3, 336, 336)
    assert image_sizes.tolist() == [[1008, 1344]] * 16
    assert counts == [1921] * 16


def test_out_of_order_image_tags_are_refused_because_they_would_swap_images():
    from phivision.processing.prompt import user_content

    with pytest.raises(PhivisionError, match=r"sample 'swap', turn 1: image tags must appear in order"):
        user_content("swap", 0, "<|image_2|>\n<|image_1|>\nCompare.", 1, 2)


def test_official_call_refuses_out_of_order_tags_too(tokenizer):
    processor = official_processor(tokenizer, 1)
    prompt = "<|user|>\n<|image_2|>\n<|image_1|>\nCompare.<|end|>\n<|assistant|>\n"
    with pytest.raises(PhivisionError, match=r"tags \[2, 1\] do not match its 2 image\(s\): write <\|image_1\|> to "
                                             r"<\|image_2\|>, each once, in order"):
        processor(prompt, [noise_image(40, 40), noise_image(40, 40)])


def test_image_too_large_to_open_safely_names_the_fix(tmp_path, monkeypatch):
    path = tmp_path / "scan.png"
    Image.new("RGB", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses over twice this many pixels
    with pytest.raises(PhivisionError, match="scan.png has too many pixels to open safely; downscale it"):
        load_image(path)
