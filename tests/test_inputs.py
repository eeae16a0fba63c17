"""Inputs mean what they say: every image mode, control-token text, duplicate ids, crops, tokenizer files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from phivision.errors import PhivisionError
from phivision.processing.images import CLIP_MEAN, CLIP_STD, hd_transform, load_image

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
    Image.fromarray(np.array([[0.0, np.nan]], np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(PhivisionError, match=r"nan\.tif.*NaN"):
        load_image(tmp_path / "nan.tif")
