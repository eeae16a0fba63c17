"""Images + conversations -> the tensors the official `Phi3VProcessor` produces, plus labels.

Token layout, as the official processor makes it: the prompt text is split at its image tags,
every text chunk is tokenised on its own with a BOS in front (so a BOS starts the prompt and
follows every image block), and tag k becomes `num_img_tokens(k)` copies of the id -k.
Answers are followed by `<|end|>\n`, the last one also by `<|endoftext|>`; only answer tokens
carry labels. An earlier answer gets the ids the official processor gives the same conversation as
an inference prompt (one text, so the answer continues the `<|assistant|>\n` text chunk); the last,
supervised answer is tokenised on its own, without BOS, as the official fine-tuning recipe does.
Questions and answers are tokenised as text: a `<|end|>` written in them is not the control token
(`__call__`, which takes a whole official prompt string, parses control tokens as the official
processor does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from phivision.errors import PhivisionError
from phivision.model.config import Phi3VConfig
from phivision.model.modeling import IGNORE_INDEX
from phivision.model.vision import num_image_tokens
from phivision.processing.images import CLIP_MEAN, CLIP_STD, crop_grid, hd_transform
from phivision.processing.prompt import ASSISTANT, IMAGE_TAG, END, user_content, user_turn
from phivision.processing.tokenizer import CONTROL_MARK, Phi3Tokenizer

PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclass
class ChatTurn:
    """One exchange; `assistant` is None for the turn a model should answer."""

    user: str
    assistant: str | None = None
    images: list[Image.Image] = field(default_factory=list)
    image_names: list[str] = field(default_factory=list)


@dataclass
class Encoded:
    """One encoded example: token ids (images as negative placeholder ids), labels and its images' pixels."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    image_sizes: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_images(self) -> int:
        return int(self.image_sizes.shape[0])


class Phi3VProcessor:
    """Prompts and images to the official processor's `input_ids`, `pixel_values` and `image_sizes`, plus labels."""

    def __init__(
        self,
        tokenizer: Phi3Tokenizer,
        num_crops: int = 4,
        crop_size: int = 336,
        merged_grid: int = 12,
        image_mean: tuple[float, ...] = CLIP_MEAN,
        image_std: tuple[float, ...] = CLIP_STD,
        extra_config: dict | None = None,
    ):
        if num_crops < 1:
            raise PhivisionError(f"num_crops must be at least 1, got {num_crops}")
        self.tokenizer = tokenizer
        self.num_crops = num_crops
        self.crop_size = crop_size
        self.merged_grid = merged_grid
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.extra_config = dict(extra_config or {})

    # ---- folders ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str | Path, num_crops: int | None = None) -> "Phi3VProcessor":
        """Geometry from config.json, crops/mean/std from preprocessor_config.json, tokenizer.json."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise PhivisionError(f"{folder} has no config.json: is it a Phi-3-V checkpoint folder?")
        config = Phi3VConfig.from_pretrained(folder)
        preprocessor = {}
        if (folder / PREPROCESSOR_FILE).is_file():
            preprocessor = json.loads((folder / PREPROCESSOR_FILE).read_text())
        return cls(
            Phi3Tokenizer.from_folder(folder),
            num_crops=preprocessor.get("num_crops", 4) if num_crops is None else num_crops,
            crop_size=config.crop_size,
            merged_grid=config.merged_grid,
            image_mean=preprocessor.get("image_mean", CLIP_MEAN),
            image_std=preprocessor.get("image_std", CLIP_STD),
            extra_config=preprocessor,
        )

    def save_pretrained(self, folder: str | Path) -> None:
        """preprocessor_config.json in the official form, and the tokenizer files.

        The `auto_map` naming the official remote code comes only from the base's own file: a
        folder without that code must not point to it.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "do_convert_rgb": True,
            "image_processor_type": "Phi3VImageProcessor",
            "processor_class": "Phi3VProcessor",
            "num_img_tokens": self.merged_grid**2,
            **self.extra_config,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "num_crops": self.num_crops,
        }
        (folder / PREPROCESSOR_FILE).write_text(json.dumps(config, indent=2) + "\n")
        self.tokenizer.save(folder)

    # ---- images -------------------------------------------------------------------------------

    def image_token_count(self, width: int, height: int, num_crops: int | None = None) -> int:
        rows, cols = crop_grid(width, height, self.num_crops if num_crops is None else num_crops, self.crop_size)
        return num_image_tokens(rows, cols, self.merged_grid)

    def process_images(
        self, images: list[Image.Image], num_crops: int | None = None, names: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """pixel_values [n, N+1, 3, S, S], image_sizes [n, 2] (padded h, w) and tokens per image."""
        num_crops = self.num_crops if num_crops is None else num_crops
        if num_crops < 1:
            raise PhivisionError(f"num_crops must be at least 1, got {num_crops}")
        names = names or [f"image {i + 1}" for i in range(len(images))]
        if not images:
            empty = torch.zeros(0, num_crops + 1, 3, self.crop_size, self.crop_size)
            return empty, torch.zeros(0, 2, dtype=torch.long), []
        pixel_values, sizes, counts = [], [], []
        for image, name in zip(images, names):
            values, (height, width) = hd_transform(
                image, num_crops, self.crop_size, self.image_mean, self.image_std, name=name
            )
            pixel_values.append(values)
            sizes.append((height, width))
            rows, cols = height // self.crop_size, width // self.crop_size
            counts.append(num_image_tokens(rows, cols, self.merged_grid))
        return torch.stack(pixel_values), torch.tensor(sizes, dtype=torch.long), counts

    # ---- text ---------------------------------------------------------------------------------

    def prompt_ids(self, text: str, tokens_per_image: list[int], first_image: int = 1, chat: bool = False) -> list[int]:
        """Official processor layout for prompt text with image tags numbered from `first_image`.

        With `chat`, only the tokenizer's `control` marks are control tokens (`encode_chat`).
        """
        encode = self.tokenizer.encode_chat if chat else self.tokenizer.encode
        pieces = IMAGE_TAG.split(text)
        ids: list[int] = []
        for position, piece in enumerate(pieces):
            if position % 2 == 0:
                ids.append(self.tokenizer.bos_id)
                ids.extend(encode(piece))
            else:
                number = int(piece)
                ids.extend([-number] * tokens_per_image[number - first_image])
        return ids

    def __call__(self, text: str, images: list[Image.Image] | None = None, num_crops: int | None = None) -> dict:
        """Like the official processor: a full prompt string with `<|image_k|>` tags and its images."""
        images = images or []
        pixel_values, image_sizes, counts = self.process_images(images, num_crops)
        tags = [int(number) for number in IMAGE_TAG.findall(text)]
        if tags != list(range(1, len(images) + 1)):
            # Placeholders are filled in order of appearance: out-of-order tags would swap images.
            raise PhivisionError(f"the prompt's image tags {tags} do not match its {len(images)} image(s): "
                                 f"write <|image_1|> to <|image_{len(images)}|>, each once, in order")
        input_ids = torch.tensor([self.prompt_ids(text, counts)], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values,
            "image_sizes": image_sizes,
        }

    def encode_conversation(
        self,
        sample_id: str,
        turns: list[ChatTurn],
        train_on: str = "all",
        num_crops: int | None = None,
        for_generation: bool = False,
    ) -> Encoded:
        """A whole conversation as one example; with `for_generation`, stop at the last `<|assistant|>\\n`."""
        all_images = [image for turn in turns for image in turn.images]
        all_names = [name for turn in turns for name in (turn.image_names or [None] * len(turn.images))]
        names = [name or f"sample {sample_id!r} image {i + 1}" for i, name in enumerate(all_names)]
        pixel_values, image_sizes, counts = self.process_images(all_images, num_crops, names)
        texts = [(turn.user, turn.assistant, len(turn.images)) for turn in turns]
        input_ids, labels = self.conversation_ids(sample_id, texts, counts, train_on, for_generation)
        return Encoded(
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            pixel_values=pixel_values,
            image_sizes=image_sizes,
        )

    def conversation_ids(
        self,
        sample_id: str,
        turns: list[tuple[str, str | None, int]],
        tokens_per_image: list[int],
        train_on: str = "all",
        for_generation: bool = False,
    ) -> tuple[list[int], list[int]]:
        """input_ids and labels from (user, assistant, number of images) per turn and image token counts.

        Needs no pixels, so token lengths of a whole dataset can be computed from image sizes alone.
        """
        if not turns:
            raise PhivisionError(f"sample {sample_id!r} has no turns")
        if train_on not in ("all", "last"):
            raise PhivisionError(f"train_on must be 'all' or 'last', got {train_on!r}")
        input_ids: list[int] = []
        labels: list[int] = []
        first_image = 1
        last = len(turns) - 1
        control = self.tokenizer.control
        for index, (user, assistant, num_images) in enumerate(turns):
            if CONTROL_MARK in user or (assistant is not None and CONTROL_MARK in assistant):
                raise PhivisionError(f"sample {sample_id!r}, turn {index + 1}: the text contains U+FDD0, a Unicode "
                                     "noncharacter phivision reserves for its chat template; remove it")
            content = user_content(sample_id, index, user, first_image, num_images)
            prompt = self.prompt_ids(user_turn(content, control), tokens_per_image[first_image - 1 :], first_image,
                                     chat=True)
            if index > 0:
                prompt = prompt[1:]  # one conversation, one leading BOS: later turns continue the text
            input_ids.extend(prompt)
            labels.extend([IGNORE_INDEX] * len(prompt))
            first_image += num_images
            if for_generation and index == last:
                break
            if assistant is None:
                raise PhivisionError(f"sample {sample_id!r}, turn {index + 1} has no assistant answer")
            if index == last:
                answer = [*self.tokenizer.encode_chat(assistant + control(END) + "\n"), self.tokenizer.endoftext_id]
            else:
                answer = self.history_answer_ids(assistant)
            input_ids.extend(answer)
            labels.extend(answer if (train_on == "all" or index == last) else [IGNORE_INDEX] * len(answer))
        return input_ids, labels

    def history_answer_ids(self, answer: str) -> list[int]:
        """An earlier answer with `<|end|>\n` as it is inside the whole prompt text.

        There it continues the text after `<|assistant|>\n` (no word-start mark of its own: "A"
        29909, where the answer alone gives "▁A" 319); the tokenizer splits at the control token,
        so tokenising from it on and dropping its ids gives exactly the in-text ids.
        """
        control = self.tokenizer.control
        lead = self.tokenizer.encode_chat(control(ASSISTANT) + "\n")
        return self.tokenizer.encode_chat(control(ASSISTANT) + "\n" + answer + control(END) + "\n")[len(lead):]
