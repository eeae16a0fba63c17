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


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Consecutive samples of the epoch's order, packed into batches of at most `max_tokens` tokens.

    A sample longer than the budget forms a batch of its own (its image tokens are never cut).
    `sampler` keeps the order a function of (seed, epoch), so resume still replays it exactly.
    """

    def __init__(self, sampler: EpochShuffleSampler, lengths: list[int], max_tokens: int):
        self.sampler = sampler
        self.lengths = lengths
        self.max_tokens = max_tokens

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def _batches(self) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        used = 0
        for index in self.sampler:
            length = self.lengths[index]
            if current and used + length > self.max_tokens:
                batches.append(current)
                current, used = [], 0
            current.append(index)
            used += length
        if current:
            batches.append(current)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
