"""The official HD image transform, with PIL, numpy and torch only (no torchvision).

An image becomes a global view plus a grid of crop_size x crop_size tiles: the long side is
scaled so the grid holds at most `num_crops` tiles, the short side is padded with white to a
multiple of the crop size, and every tile is normalised with the CLIP mean and std.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from phivision.errors import PhivisionError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """PIL's image at `path`, with one clear error for a missing, corrupt, empty or oversized file."""
    if not path.is_file():
        raise PhivisionError(f"image {path} does not exist")
    if path.stat().st_size == 0:
        raise PhivisionError(f"image {path} is an empty file")
    try:
        with Image.open(path) as image:
            yield image
    except Image.DecompressionBombError:
        raise PhivisionError(f"image {path} has too many pixels to open safely; downscale it (the model sees "
                             "at most 16 crops of 336 pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise PhivisionError(f"image {path} cannot be decoded ({error}); re-export or remove it "
                             "(`phivision validate` decodes every image)") from None


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, pixels as stored (no EXIF rotation, like the official recipe's `Image.open`)."""
    with _opened(Path(path)) as image:
        image.load()
        return to_rgb(image, name=f"image {path}")


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of what `load_image` returns, read from the file's header without decoding.

    `load_image` applies no EXIF orientation, so the stored size is the size; a file truncated
    after its header passes here and fails when training loads it (`phivision validate` decodes).
    """
    with _opened(Path(path)) as image:
        return image.size


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """RGB with transparent pixels (alpha or a `tRNS` key colour) composited on white.

    One rule for every mode: white is also the HD transform's padding colour. 16-bit, 32-bit and
    float greyscale is first scaled to 8 bits (see `high_depth_to_8bit`).
    """
    if image.mode in HIGH_DEPTH_MODES:
        image = high_depth_to_8bit(image, name)
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def high_depth_to_8bit(image: Image.Image, name: str = "image") -> Image.Image:
    """Greyscale beyond 8 bits as L (LA where a key colour marks transparent pixels).

    I;16 and I whose values fit 0..65535: value / 257, rounded (65535 -> 255). Other I: min-max
    to 0..255. F: values within 0..1 times 255, rounded; other F: min-max. A constant image
    outside those ranges becomes black; NaN or infinite pixels are refused.
    """
    values = np.asarray(image).astype(np.float64)
    if not np.isfinite(values).all():
        raise PhivisionError(f"{name} ({image.mode}) has NaN or infinite pixels; re-export it with finite values")
    low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
    if image.mode == "F" and 0.0 <= low and high <= 1.0:
        scaled = values * 255.0
    elif image.mode != "F" and 0.0 <= low and high <= 65535.0:
        scaled = values / 257.0
    else:
        scaled = (values - low) * 255.0 / (high - low) if high > low else np.zeros_like(values)
    grey = Image.fromarray(np.rint(scaled).astype(np.uint8))
    key = image.info.get("transparency")
    if isinstance(key, (int, float)) and image.mode != "F":
        alpha = np.where(values == key, 0, 255).astype(np.uint8)
        grey = Image.merge("LA", (grey, Image.fromarray(alpha)))
    return grey


def hd_grid(width: int, height: int, num_crops: int, crop_size: int) -> tuple[int, int, int, int]:
    """(resized_w, resized_h, padded_h, padded_w) for a landscape-or-square image (w >= h)."""
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = scale * crop_size
    new_h = int(new_w / ratio)
    padded_h = math.ceil(new_h / crop_size) * crop_size
    return new_w, new_h, padded_h, new_w


def crop_grid(width: int, height: int, num_crops: int, crop_size: int) -> tuple[int, int]:
    """(rows, cols) of HD tiles an image of this size gets: what the token count depends on."""
    if num_crops < 1:
        raise PhivisionError(f"num_crops must be at least 1, got {num_crops}")
    if width < height:
        cols, rows = crop_grid(height, width, num_crops, crop_size)
        return rows, cols
    _, _, padded_h, padded_w = hd_grid(width, height, num_crops, crop_size)
    return padded_h // crop_size, padded_w // crop_size


def hd_transform(
    image: Image.Image,
    num_crops: int,
    crop_size: int = 336,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
    name: str = "image",
) -> tuple[torch.Tensor, tuple[int, int]]:
    """pixel_values [num_crops + 1, 3, S, S] (global view, tiles row-major, zero tiles) and (padded_h, padded_w)."""
    if num_crops < 1:
        raise PhivisionError(f"num_crops must be at least 1, got {num_crops}")
    if image.width < 1 or image.height < 1:
        raise PhivisionError(f"{name} has zero size ({image.width}x{image.height})")
    image = to_rgb(image, name)
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    new_w, new_h, padded_h, padded_w = hd_grid(image.width, image.height, num_crops, crop_size)
    if new_h < 1:
        raise PhivisionError(
            f"{name} is too elongated ({image.width}x{image.height}) for num_crops={num_crops}: "
            "its short side would shrink to 0 pixels; crop it or raise num_crops"
        )
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas = np.full((padded_h, padded_w, 3), 255, dtype=np.uint8)
    top = (padded_h - new_h) // 2
    canvas[top : top + new_h] = np.asarray(resized)
    if transposed:
        canvas = canvas.transpose(1, 0, 2)
        padded_h, padded_w = padded_w, padded_h
    hd = torch.from_numpy(np.ascontiguousarray(canvas)).permute(2, 0, 1).float().div_(255.0)
    hd = hd.sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))
    global_view = F.interpolate(hd[None], size=(crop_size, crop_size), mode="bicubic", align_corners=False)
    rows, cols = padded_h // crop_size, padded_w // crop_size
    tiles = hd.reshape(3, rows, crop_size, cols, crop_size).permute(1, 3, 0, 2, 4).reshape(-1, 3, crop_size, crop_size)
    pixel_values = torch.zeros(num_crops + 1, 3, crop_size, crop_size)
    pixel_values[0] = global_view[0]
    pixel_values[1 : 1 + rows * cols] = tiles
    return pixel_values, (padded_h, padded_w)
