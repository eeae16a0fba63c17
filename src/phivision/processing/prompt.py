"""Chat prompt text: image tags and the Phi-3 chat template.

Images are numbered globally across a conversation (`<|image_1|>` .. `<|image_n|>`), unlike the
official eval dataset, which restarts numbering in every turn and so breaks multi-turn data.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from phivision.errors import PhivisionError

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")

USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"


def user_content(sample_id: str, turn_index: int, text: str, first_image: int, num_images: int) -> str:
    """The user message with image tags: added in front when absent, checked when present.

    `first_image` is the global number of this turn's first image. Tags written by hand must be
    exactly this turn's numbers, each once.
    """
    expected = list(range(first_image, first_image + num_images))
    written = [int(number) for number in IMAGE_TAG.findall(text)]
    where = f"sample {sample_id!r}, turn {turn_index + 1}"
    if not written:
        return "".join(f"<|image_{number}|>\n" for number in expected) + text
    duplicates = sorted({number for number in written if written.count(number) > 1})
    if duplicates:
        raise PhivisionError(f"{where}: image tag(s) {_tags(duplicates)} appear more than once")
    if sorted(written) != expected:
        wanted = _tags(expected) if expected else "no tags (the turn has no images)"
        raise PhivisionError(
            f"{where}: the text has image tags {_tags(written)} but its {num_images} image(s) "
            f"need {wanted} (tags are numbered across the whole conversation)"
        )
    if written != expected:
        # The model fills placeholders in order of appearance: out-of-order tags would swap images.
        raise PhivisionError(f"{where}: image tags must appear in order ({_tags(expected)}), got {_tags(written)}")
    return text


def _tags(numbers: list[int]) -> str:
    return ", ".join(f"<|image_{number}|>" for number in numbers)


def user_turn(content: str, control: Callable[[str], str] = str) -> str:
    """One user message in the chat template, followed by the generation prompt.

    `control` writes each control token the template places (the tokenizer's `control` marks
    them, so that the same strings inside `content` stay text).
    """
    return f"{control(USER)}\n{content}{control(END)}\n{control(ASSISTANT)}\n"

