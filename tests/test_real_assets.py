"""Real assets: llama.cpp's reference tokenizations, official-style prompts, real photos.

Expected ids, grids, sizes and token counts are worked out by hand from the official rules and
written as literals.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phivision.processing.images import crop_grid, load_image, to_rgb
from phivision.processing.processor import ChatTurn, Phi3VProcessor
from phivision.processing.tokenizer import Phi3Tokenizer

DATA = Path(__file__).parent / "data"
SEPARATOR = "\n__ggml_vocab_test__\n"


# ---- llama.cpp reference tokenizations ----------------------------------------------------------


def reference_cases() -> list[tuple[str, list[int]]]:
    """(input, ids) pairs, split the way llama.cpp's test-tokenizer-0 splits its .inp/.out files.

    Every input is followed by the separator, so the text after the last one is not an input.
    """
    inputs = (DATA / "reference-inputs.txt").read_bytes().decode("utf-8").split(SEPARATOR)
    lines = (DATA / "reference-ids.txt").read_bytes().decode("utf-8").split("\n")
    assert inputs[-1] == "" and lines[-1] == ""
    inputs, lines = inputs[:-1], lines[:-1]
    assert len(inputs) == len(lines) == 46
    return [(text, [int(token) for token in line.split()]) for text, line in zip(inputs, lines)]


@pytest.fixture(scope="module")
def bundled():
    return Phi3Tokenizer.bundled()


@pytest.mark.parametrize("source", ["bundled", "model folder"])
def test_reference_tokenizations(source, bundled, tiny_model_dir):
    tokenizer = bundled if source == "bundled" else Phi3Tokenizer.from_folder(tiny_model_dir)
    cases = reference_cases()
    assert cases[11] == ("Hello world", [15043, 3186])
    wrong = [(text, ids, tokenizer.encode(text)) for text, ids in cases if tokenizer.encode(text) != ids]
    assert wrong == []


def test_decode_gives_the_text_back(bundled):
    wrong = [text for text, ids in reference_cases() if bundled.decode(ids) != text]
    assert wrong == []


def test_decode_of_generated_answer_drops_special_tokens(bundled):
    generated = [4779, 29871, 29945, 29892, 29871, 29896, 29929, 29953, 29906, 32007]
    assert bundled.decode(generated) == "March 5, 1962"
    assert bundled.decode([1, -1, -1, 5852, 32007, 32000]) == "True"


# ---- official prompt layouts (tiny processor: crop 56, merged grid 2, N=4) ---------------------

BOS_USER = [1, 32010, 29871, 13]
END_ASSISTANT = [32007, 29871, 13, 32001, 29871, 13]
END_OF_TEXT = [32007, 29871, 13, 32000]


def blank(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (200, 180, 160))


def test_docvqa_single_image(tiny_processor):
    """170x220 page (portrait, ratio 1.29, scale 2) -> 2x2 grid -> (4+1)*4 + 1 + 3*2 = 27 tokens."""
    turn = ChatTurn("<|image_1|>\nWhat is the date?", "March 5, 1962", [blank(170, 220)])
    encoded = tiny_processor.encode_conversation("docvqa-1", [turn])
    question = [1, 29871, 13, 5618, 338, 278, 2635, 29973] + END_ASSISTANT
    answer = [4779, 29871, 29945, 29892, 29871, 29896, 29929, 29953, 29906] + END_OF_TEXT
    assert encoded.input_ids.tolist() == BOS_USER + [-1] * 27 + question + answer
    assert encoded.labels.tolist() == [-100] * (4 + 27 + 14) + answer
    assert encoded.image_sizes.tolist() == [[112, 112]]


def test_nlvr2_two_images(tiny_processor):
    """112x40 -> 1x2 grid, 17 tokens; 40x112 -> 2x1 grid, (2+1)*4 + 1 + 3*2 = 19 tokens."""
    text = "<|image_1|>\n<|image_2|>\nThe left image has more dogs than the right image. True or False?"
    turn = ChatTurn(text, "True", [blank(112, 40), blank(40, 112)])
    encoded = tiny_processor.encode_conversation("nlvr2-1", [turn])
    statement = [
        1, 29871, 13, 1576, 2175, 1967, 756, 901, 26361, 1135, 278, 1492, 1967, 29889, 5852, 470, 7700, 29973,
    ] + END_ASSISTANT
    answer = [5852] + END_OF_TEXT
    prompt = BOS_USER + [-1] * 17 + [1, 29871, 13] + [-2] * 19 + statement
    assert encoded.input_ids.tolist() == prompt + answer
    assert encoded.labels.tolist() == [-100] * len(prompt) + answer
    assert len(prompt) == 4 + 17 + 3 + 19 + 24
    assert encoded.image_sizes.tolist() == [[56, 112], [112, 56]]


def test_ucf101_eight_frames(tiny_processor):
    """8 frames at num_crops=1: 1x1 grid each, (1+1)*4 + 1 + 2*2 = 13 tokens."""
    tags = "".join(f"<|image_{k}|>\n" for k in range(1, 9))
    text = tags + "Classify the video into one of the following classes: ApplyEyeMakeup, Archery, Basketball."
    frames = [blank(320, 240) for _ in range(8)]
    encoded = tiny_processor.encode_conversation("train-0000000042", [ChatTurn(text, "Archery", frames)], num_crops=1)
    instruction = [
        1, 29871, 13, 2385, 1598, 278, 4863, 964, 697, 310, 278, 1494, 4413, 29901,
        2401, 368, 29923, 4099, 9984, 786, 29892, 2595, 708, 29892, 21850, 29889,
    ] + END_ASSISTANT
    prompt = (
        BOS_USER + [-1] * 13 + [1, 29871, 13] + [-2] * 13 + [1, 29871, 13] + [-3] * 13 + [1, 29871, 13]
        + [-4] * 13 + [1, 29871, 13] + [-5] * 13 + [1, 29871, 13] + [-6] * 13 + [1, 29871, 13]
        + [-7] * 13 + [1, 29871, 13] + [-8] * 13 + instruction
    )
    answer = [2595, 708] + END_OF_TEXT
    assert encoded.input_ids.tolist() == prompt + answer
    assert encoded.labels.tolist() == [-100] * len(prompt) + answer
    assert encoded.pixel_values.shape == (8, 2, 3, 56, 56)
    assert encoded.image_sizes.tolist() == [[56, 56]] * 8


def test_two_turn_conversation(tiny_processor):
    """The second turn has no image: no BOS of its own, its question follows the first answer."""
    turns = [
        ChatTurn("What animal is this?", "A cat.", [blank(60, 60)]),
        ChatTurn("What colour is it?", "Orange."),
    ]
    encoded = tiny_processor.encode_conversation("chat-7", turns)
    first = BOS_USER + [-1] * 27 + [1, 29871, 13, 5618, 13019, 338, 445, 29973] + END_ASSISTANT
    first_answer = [29909, 6635, 29889, 32007, 29871, 13]  # "A", not "▁A" 319: as inside the whole prompt text
    second = [32010, 29871, 13, 5618, 12384, 338, 372, 29973] + END_ASSISTANT
    second_answer = [26048, 29889] + END_OF_TEXT
    assert encoded.input_ids.tolist() == first + first_answer + second + second_answer
    assert encoded.labels.tolist() == [-100] * 45 + first_answer + [-100] * 14 + second_answer


# ---- real photos at the official geometry -------------------------------------------------------

# Per photo: (width, height) and per num_crops: (crop grid, image_sizes, tokens). For ratio
# r = long/short, scale = largest s with s * ceil(s / r) <= N; long = 336 s, short = int(long / r)
# padded up to a multiple of 336; tokens = (rows * cols + 1) * 144 + 1 + (rows + 1) * 12.
SQUARE = {1: ((1, 1), (336, 336), 313), 4: ((2, 2), (672, 672), 757), 16: ((4, 4), (1344, 1344), 2509)}
THREE_BY_TWO = {1: ((1, 1), (336, 336), 313), 4: ((2, 2), (672, 672), 757), 16: ((3, 4), (1008, 1344), 1921)}
PHOTOS = {
    "astronaut": ((512, 512), SQUARE),
    "chelsea": ((451, 300), THREE_BY_TWO),  # N=16: 1344 x int(894.0) -> 1008
    "coffee": ((600, 400), THREE_BY_TWO),
    "rocket": ((640, 427), THREE_BY_TWO),
    "rocket_portrait": (
        (427, 640),
        {1: ((1, 1), (336, 336), 313), 4: ((2, 2), (672, 672), 757), 16: ((4, 3), (1344, 1008), 1933)},
    ),
    "page": (  # r = 2.01: N=4 scale 2, 672 x 334 -> 336; N=16 scale 5, 1680 x 835 -> 1008
        (384, 191),
        {1: ((1, 1), (336, 336), 313), 4: ((1, 2), (336, 672), 457), 16: ((3, 5), (1008, 1680), 2353)},
    ),
    "text": (  # r = 2.60: N=16 scale 5 (6 * 3 = 18 > 16), 1680 x 645 -> 672
        (448, 172),
        {1: ((1, 1), (336, 336), 313), 4: ((1, 2), (336, 672), 457), 16: ((2, 5), (672, 1680), 1621)},
    ),
    "motorcycle_left": ((741, 500), THREE_BY_TWO),
    "china.jpg": ((640, 427), THREE_BY_TWO),
    "flower.jpg": ((640, 427), THREE_BY_TWO),
    "grace_hopper.jpg": ((512, 600), SQUARE),  # portrait r = 1.17: N=16 scale 4, 1344 x 1146 -> 1344
}


def load_photo(name: str) -> Image.Image:
    """The named photo from scikit-image, scikit-learn or matplotlib (skipped when unavailable)."""
    if name.endswith(".jpg") and name != "grace_hopper.jpg":
        datasets = pytest.importorskip("sklearn.datasets")
        return Image.fromarray(datasets.load_sample_image(name))
    if name == "grace_hopper.jpg":
        matplotlib = pytest.importorskip("matplotlib")
        path = Path(matplotlib.get_data_path()) / "sample_data" / name
        if not path.is_file():
            pytest.skip(f"matplotlib has no {path}")
        return load_image(path)
    data = pytest.importorskip("skimage.data")
    try:
        if name == "motorcycle_left":
            return Image.fromarray(data.stereo_motorcycle()[0])
        if name == "rocket_portrait":
            return Image.fromarray(data.rocket()).transpose(Image.Transpose.ROTATE_90)
        return Image.fromarray(getattr(data, name)())
    except (OSError, ValueError, ImportError) as error:  # datasets that need a download (pooch)
        pytest.skip(f"skimage.data.{name} is not available offline: {error}")


@pytest.fixture(scope="module")
def official(bundled):
    return Phi3VProcessor(bundled, num_crops=16, crop_size=336, merged_grid=12)


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_real_photo_geometry(official, name):
    size, expected = PHOTOS[name]
    photo = load_photo(name)
    assert photo.size == size
    for num_crops, (grid, image_size, tokens) in expected.items():
        pixel_values, image_sizes, counts = official.process_images([photo], num_crops=num_crops)
        assert crop_grid(*size, num_crops, 336) == grid, num_crops
        assert image_sizes.tolist() == [list(image_size)], num_crops
        assert counts == [tokens], num_crops
        assert official.image_token_count(*size, num_crops=num_crops) == tokens
        assert pixel_values.shape == (1, num_crops + 1, 3, 336, 336)
        used = grid[0] * grid[1] + 1
        assert pixel_values[0, used:].abs().sum() == 0
        assert (pixel_values[0, :used].flatten(1).abs().sum(1) > 0).all()


# ---- colour modes of a real photo ---------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_rgb() -> np.ndarray:
    data = pytest.importorskip("skimage.data")
    return data.chelsea()


def converted(image: Image.Image, tmp_path: Path, file_name: str) -> list[np.ndarray]:
    """The RGB pixels `to_rgb` gives in memory and `load_image` gives after a lossless save."""
    image.save(tmp_path / file_name)
    return [np.asarray(to_rgb(image)), np.asarray(load_image(tmp_path / file_name))]


def test_grayscale_photo(photo_rgb, tmp_path):
    gray = np.asarray(Image.fromarray(photo_rgb).convert("L"))
    expected = np.stack([gray, gray, gray], axis=-1)
    for rgb in converted(Image.fromarray(gray), tmp_path, "gray.png"):
        np.testing.assert_array_equal(rgb, expected)


def test_rgba_photo_composited_on_white(photo_rgb, tmp_path):
    """Alpha 0 -> white, 255 -> the photo, 128 -> (c * 128 + 255 * 127) / 255 (to one level)."""
    height, width, _ = photo_rgb.shape
    alpha = np.full((height, width), 255, dtype=np.uint8)
    alpha[:, : width // 3] = 0
    alpha[:, width // 3 : 2 * width // 3] = 128
    rgba = Image.fromarray(np.dstack([photo_rgb, alpha]))
    weight = alpha[..., None].astype(np.float64) / 255.0
    expected = photo_rgb * weight + 255.0 * (1.0 - weight)
    for rgb in converted(rgba, tmp_path, "rgba.png"):
        np.testing.assert_array_equal(rgb[:, : width // 3], 255)
        np.testing.assert_array_equal(rgb[:, 2 * width // 3 :], photo_rgb[:, 2 * width // 3 :])
        np.testing.assert_allclose(rgb, expected, atol=1.0)


def test_palette_photo(photo_rgb, tmp_path):
    paletted = Image.fromarray(photo_rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    indices = np.asarray(paletted)
    palette = np.array(paletted.getpalette(), dtype=np.uint8).reshape(-1, 3)
    for rgb in converted(paletted, tmp_path, "palette.png"):
        np.testing.assert_array_equal(rgb, palette[indices])


def test_palette_photo_with_transparency(photo_rgb, tmp_path):
    """The transparent palette entry becomes white; every other pixel is its palette colour."""
    paletted = Image.fromarray(photo_rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    indices = np.asarray(paletted)
    transparent = int(indices[0, 0])
    paletted.info["transparency"] = transparent
    palette = np.array(paletted.getpalette(), dtype=np.uint8).reshape(-1, 3)
    expected = palette[indices]
    expected[indices == transparent] = 255
    assert 0 < (indices == transparent).mean() < 1
    for rgb in converted(paletted, tmp_path, "transparent.png"):
        np.testing.assert_array_equal(rgb, expected)


def test_cmyk_photo(photo_rgb, tmp_path):
    """C, M, Y = 255 - R, G, B with K = 0 is the photo itself."""
    cmyk_pixels = np.dstack([255 - photo_rgb, np.zeros(photo_rgb.shape[:2], dtype=np.uint8)])
    height, width, _ = photo_rgb.shape
    cmyk = Image.frombytes("CMYK", (width, height), np.ascontiguousarray(cmyk_pixels).tobytes())
    for rgb in converted(cmyk, tmp_path, "cmyk.tiff"):
        np.testing.assert_array_equal(rgb, photo_rgb)
