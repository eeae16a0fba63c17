"""Synthetic training samples with the shapes of the real fine-tuning datasets.

No dataset is downloaded: each workload is a fixed cycle of sample shapes (image sizes, crop
budget, prompt and answer length) taken from the public datasets, rendered as random pixels
and random words, and encoded by the real `Phi3VProcessor`. Image sizes are written at the
official 336-px crop geometry; a smaller preset scales them by crop_size / 336, which keeps
every crop grid (so the crop count) and shrinks only the tokens per crop.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from phivision.model.vision import num_image_tokens
from phivision.processing.images import crop_grid
from phivision.processing.processor import ChatTurn, Encoded, Phi3VProcessor

OFFICIAL_CROP_SIZE = 336
OFFICIAL_MERGED_GRID = 12
WORKLOADS = ("docvqa", "memes", "video", "mixed")

# Filler vocabulary for prompts and answers: ordinary English words, about one token each.
WORDS = (
    "the total amount date invoice name page report table figure year company address number "
    "what which where when who how many is was are of in on for to from by with and or value "
    "meeting letter program budget sales market person office street city state phone code "
    "account order item price cost rate percent week month day time first last left right"
).split()
# 101 class names, as long as UCF101's, for the video prompt that lists them all.
ACTION_STEMS = ("Apply Band Base Bench Blow Body Bowl Boxing Breast Clean Cliff Cutting Diving Drum Fencing "
                "Field Floor Frisbee Front Golf Haircut Hammer Handstand Head High Horse Hula Ice Javelin "
                "Juggling Jump Kayak Knitting Long Lunge Military Mixing Mopping Nunchucks Parallel Pizza "
                "Playing Pole Pommel Pull Punch Push Rafting Rock Rope Rowing Salsa Shaving Skate Skiing").split()
ACTION_OBJECTS = ("EyeMakeup Lipstick Ball Press Dryer Weights Roll Punch Jerk Kitchen Ring Tossing Catch "
                  "Crawl Swing Cut Throw Walk Dance Tennis Flute Guitar Piano Vault Climbing Ups Horse").split()


@dataclass(frozen=True)
class SampleShape:
    """One sample's geometry and text length; `image_sizes` are (width, height) at 336-px crops."""

    kind: str
    image_sizes: tuple[tuple[int, int], ...]
    num_crops: int
    question_words: int
    answer_words: int
    lists_classes: bool = False


LETTER_PAGE = ((1700, 2200), (1654, 2140), (1728, 2236), (2200, 1700), (1700, 2200))
LEGAL_PAGE = (1700, 2800)
MEME_SIZES = ((550, 550), (800, 533), (600, 800), (1000, 563), (640, 480), (500, 750))
PAIR_SIZES = (((640, 480), (500, 500)), ((800, 600), (480, 640)), ((1024, 683), (600, 400)))
VIDEO_FRAME = (320, 240)


def docvqa_cycle() -> list[SampleShape]:
    """DocVQA pages at 16 crops: mostly letter-size scans (4x4 crops), one in six longer (4x3).

    That mix gives a mean of about 2443 tokens per sample at the official geometry, the mean the
    official recipe reports for DocVQA.
    """
    pages = [*LETTER_PAGE, LEGAL_PAGE]
    return [SampleShape("docvqa", (size,), 16, 9 + index % 3, 2 + index % 2) for index, size in enumerate(pages)]


def memes_cycle() -> list[SampleShape]:
    """Hateful Memes: one photo-like image of assorted aspect ratios at 16 crops, its caption, yes/no."""
    return [SampleShape("memes", (size,), 16, 14 + 3 * (index % 3), 1) for index, size in enumerate(MEME_SIZES)]


def pairs_cycle() -> list[SampleShape]:
    """NLVR2-like: two images at 4 crops each and a statement to judge true or false."""
    return [SampleShape("pairs", sizes, 4, 12 + index, 1) for index, sizes in enumerate(PAIR_SIZES)]


def video_cycle() -> list[SampleShape]:
    """UCF101 as the official recipe converts it: 8 frames at 4 crops, a prompt listing all classes."""
    return [SampleShape("video", (VIDEO_FRAME,) * 8, 4, 0, 1, lists_classes=True)]


def workload_cycle(workload: str) -> list[SampleShape]:
    """The repeating pattern of a workload; `mixed` interleaves documents, memes, pairs and videos."""
    if workload == "docvqa":
        return docvqa_cycle()
    if workload == "memes":
        return memes_cycle()
    if workload == "video":
        return video_cycle()
    if workload == "mixed":
        docs, memes, pairs, video = docvqa_cycle(), memes_cycle(), pairs_cycle(), video_cycle()[0]
        return [docs[0], memes[0], pairs[0], docs[5], memes[1], video, docs[1], memes[2], pairs[1], video]
    raise ValueError(f"unknown workload {workload!r}: choose one of {', '.join(WORKLOADS)}")


def sample_shapes(workload: str, count: int, num_crops: int | None = None) -> list[SampleShape]:
    """`count` samples of the workload's cycle; `num_crops` caps every image's crop budget."""
    cycle = workload_cycle(workload)
    if num_crops is not None:
        cycle = [dataclasses.replace(shape, num_crops=min(shape.num_crops, num_crops)) for shape in cycle]
    return [cycle[index % len(cycle)] for index in range(count)]


def scaled_size(size: tuple[int, int], crop_size: int) -> tuple[int, int]:
    """An official-geometry image size for a model with smaller crops: the same grid of crops."""
    width, height = size
    scale = crop_size / OFFICIAL_CROP_SIZE
    return max(1, round(width * scale)), max(1, round(height * scale))


def class_names() -> list[str]:
    names = sorted({stem + obj for stem in ACTION_STEMS for obj in ACTION_OBJECTS})
    return random.Random(101).sample(names, 101)


def sample_text(shape: SampleShape, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of the shape's length in filler words."""
    answer = " ".join(rng.choice(WORDS) for _ in range(shape.answer_words))
    if shape.lists_classes:
        classes = sorted(class_names())
        return f"Classify the video into one of the following classes: {', '.join(classes)}.", rng.choice(classes)
    question = " ".join(rng.choice(WORDS) for _ in range(shape.question_words))
    return question.capitalize() + "?", answer


def text_rng(seed: int, index: int) -> random.Random:
    """The words of sample `index` depend on (seed, index) only, so lengths can be computed apart."""
    return random.Random(seed * 100_003 + index)


def sample_token_count(shape: SampleShape, processor: Phi3VProcessor, index: int = 0, seed: int = 0) -> int:
    """Tokens of sample `index`, from the crop grids alone (no pixels): works at any geometry."""
    question, answer = sample_text(shape, text_rng(seed, index))
    counts = []
    for size in shape.image_sizes:
        width, height = scaled_size(size, processor.crop_size)
        rows, cols = crop_grid(width, height, shape.num_crops, processor.crop_size)
        counts.append(num_image_tokens(rows, cols, processor.merged_grid))
    ids, _ = processor.conversation_ids("bench", [(question, answer, len(shape.image_sizes))], counts)
    return len(ids)


def random_image(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Random pixels: content does not change the cost, and the loss stays away from zero."""
    width, height = size
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode_samples(shapes: list[SampleShape], processor: Phi3VProcessor, seed: int = 0) -> list[Encoded]:
    """Encodings of every shape; image slots are zero-padded to the most any shape has (N + 1).

    That is the tensor layout the official processor gives a dataset whose largest crop budget is
    N: every image carries N + 1 slots whether or not its grid uses them.
    """
    slots = max(shape.num_crops for shape in shapes) + 1
    pixels = np.random.default_rng(seed)
    encodings = []
    for index, shape in enumerate(shapes):
        question, answer = sample_text(shape, text_rng(seed, index))
        images = [random_image(scaled_size(size, processor.crop_size), pixels) for size in shape.image_sizes]
        encoding = processor.encode_conversation(
            f"{shape.kind}-{index}", [ChatTurn(question, answer, images)], num_crops=shape.num_crops
        )
        padding = slots - encoding.pixel_values.shape[1]
        if padding:
            zeros = encoding.pixel_values.new_zeros(encoding.num_images, padding, *encoding.pixel_values.shape[2:])
            encoding.pixel_values = torch.cat([encoding.pixel_values, zeros], dim=1)
        encodings.append(encoding)
    return encodings


def official_processor(num_crops: int = 16) -> Phi3VProcessor:
    """The official geometry's processor, for token counts without building a 4B model."""
    from phivision.processing.tokenizer import Phi3Tokenizer

    return Phi3VProcessor(Phi3Tokenizer.bundled(), num_crops, OFFICIAL_CROP_SIZE, OFFICIAL_MERGED_GRID)
