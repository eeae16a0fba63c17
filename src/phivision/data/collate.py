"""Batches: right-padded for training, padding-free packed rows, left-padded for generation.

Images of every sample in a batch are stacked in sample order, which is the order the model
fills the placeholder positions in. Crop slots that no image of the batch uses are dropped
before the batch is built, so memory follows the real crop count, not `num_crops + 1`.
"""

from __future__ import annotations

import torch

from phivision.processing.processor import IGNORE_INDEX, Encoded


def stack_images(encodings: list[Encoded], crop_size: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """pixel_values [images, crops, 3, S, S] trimmed to the most crops any image uses, and image_sizes."""
    with_images = [encoding for encoding in encodings if encoding.num_images]
    if not with_images:
        return None, None
    image_sizes = torch.cat([encoding.image_sizes for encoding in with_images])
    crops_used = (image_sizes[:, 0] // crop_size) * (image_sizes[:, 1] // crop_size) + 1
    keep = int(crops_used.max())
    pixel_values = torch.cat([encoding.pixel_values[:, :keep] for encoding in with_images])
    return pixel_values, image_sizes


class Collator:
    """Turns processor encodings into model inputs; `packing` concatenates the batch into one row."""

    def __init__(self, pad_id: int, crop_size: int, packing: bool = False):
        self.pad_id = pad_id
        self.crop_size = crop_size
        self.packing = packing

    def __call__(self, encodings: list[Encoded]) -> dict[str, torch.Tensor]:
        batch = self.packed(encodings) if self.packing else self.right_padded(encodings)
        pixel_values, image_sizes = stack_images(encodings, self.crop_size)
        if pixel_values is not None:
            batch["pixel_values"] = pixel_values
            batch["image_sizes"] = image_sizes
        return batch

    def right_padded(self, encodings: list[Encoded]) -> dict[str, torch.Tensor]:
        length = max(len(encoding) for encoding in encodings)
        input_ids = torch.full((len(encodings), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(encodings), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encodings), length), dtype=torch.long)
        for row, encoding in enumerate(encodings):
            size = len(encoding)
            input_ids[row, :size] = encoding.input_ids
            labels[row, :size] = encoding.labels
            attention_mask[row, :size] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    def packed(self, encodings: list[Encoded]) -> dict[str, torch.Tensor]:
        """One row, no padding; position ids restart per sample, which confines attention to it.

        No attention mask is passed: `transformers` then derives a block-diagonal mask (sdpa,
        eager) or variable-length kernels (flash-attention) from the restarting position ids.
        """
        input_ids = torch.cat([encoding.input_ids for encoding in encodings])[None]
        labels = torch.cat([encoding.labels for encoding in encodings])[None]
        position_ids = torch.cat([torch.arange(len(encoding)) for encoding in encodings])[None]
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def left_padded_prompts(encodings: list[Encoded], pad_id: int, crop_size: int) -> dict[str, torch.Tensor]:
    """Generation inputs: prompts aligned on the right so every row continues at the same column."""
    length = max(len(encoding) for encoding in encodings)
    input_ids = torch.full((len(encodings), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encodings), length), dtype=torch.long)
    for row, encoding in enumerate(encodings):
        size = len(encoding)
        input_ids[row, length - size :] = encoding.input_ids
        attention_mask[row, length - size :] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    pixel_values, image_sizes = stack_images(encodings, crop_size)
    if pixel_values is not None:
        batch["pixel_values"] = pixel_values
        batch["image_sizes"] = image_sizes
    return batch
