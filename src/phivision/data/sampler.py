"""Deterministic sample order: a function of (seed, epoch) alone, so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

# Length grouping sorts within windows of this many batches: similar lengths, still shuffled.
GROUP_WINDOW_BATCHES = 50


class EpochShuffleSampler(Sampler[int]):
    def __init__(self, size: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1):
        self.size = size
        self.seed = seed
        self.lengths = lengths
        self.batch_size = batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is None:
            return iter(order)
        window = self.batch_size * GROUP_WINDOW_BATCHES
        grouped: list[int] = []
        for start in range(0, self.size, window):
            grouped.extend(sorted(order[start : start + window], key=lambda i: -self.lengths[i]))
        return iter(grouped)
