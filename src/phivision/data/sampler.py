"""Deterministic sample order: a function of (seed, epoch) alone, so a resumed run sees the same batches."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from phivision.errors import PhivisionError

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

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is None:
            return order
        window = self.batch_size * GROUP_WINDOW_BATCHES
        grouped: list[int] = []
        for start in range(0, self.size, window):
            grouped.extend(sorted(order[start : start + window], key=lambda i: -self.lengths[i]))
        return grouped

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch))


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Consecutive samples of the epoch's order, packed into batches of at most `max_tokens` tokens.

    A sample longer than the budget forms a batch of its own (its image tokens are never cut).
    `sampler` keeps the order a function of (seed, epoch), so resume still replays it exactly.

    Every epoch has the same number of batches, a multiple of `batch_multiple` (gradient
    accumulation x processes): the Trainer plans its steps from one epoch's length, every optimiser
    step then takes whole micro-batches of one epoch and every rank as many. That number is the
    most any epoch of the run (`epochs`, or as many as `max_steps` takes) packs greedily, rounded
    up; an epoch that packs into fewer splits its fullest batches until it has as many.
    """

    def __init__(self, sampler: EpochShuffleSampler, lengths: list[int], max_tokens: int,
                 batch_multiple: int = 1, epochs: int = 1, max_steps: int = -1):
        self.sampler = sampler
        self.lengths = lengths
        self.max_tokens = max_tokens
        self.batch_multiple = batch_multiple
        self.num_batches = self._batches_per_epoch(epochs, max_steps)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def _greedy(self, epoch: int) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        used = 0
        for index in self.sampler.order(epoch):
            length = self.lengths[index]
            if current and used + length > self.max_tokens:
                batches.append(current)
                current, used = [], 0
            current.append(index)
            used += length
        if current:
            batches.append(current)
        return batches

    def _round_up(self, count: int) -> int:
        return math.ceil(count / self.batch_multiple) * self.batch_multiple

    def _batches_per_epoch(self, epochs: int, max_steps: int) -> int:
        """The count for every epoch; with `max_steps`, more batches per epoch can mean fewer epochs."""
        greedy = [len(self._greedy(0))]
        count = self._round_up(greedy[0])
        while True:
            needed = epochs if max_steps <= 0 else math.ceil(max_steps * self.batch_multiple / count)
            greedy.extend(len(self._greedy(epoch)) for epoch in range(len(greedy), needed))
            widest = self._round_up(max(greedy[:needed]))
            if widest <= count:
                break
            count = widest
        if count > len(self.lengths):
            raise PhivisionError(
                f"max_tokens_per_batch={self.max_tokens}: {len(self.lengths)} samples cannot fill {count} "
                f"micro-batches per epoch (a multiple of gradient accumulation x processes = {self.batch_multiple}); "
                "lower global_batch_size or use more samples"
            )
        return count

    def _batches(self) -> list[list[int]]:
        batches = self._greedy(self.sampler.epoch)
        tokens = [sum(self.lengths[i] for i in batch) for batch in batches]
        while len(batches) < self.num_batches:
            fullest = max((i for i, batch in enumerate(batches) if len(batch) > 1), key=tokens.__getitem__)
            batch = batches[fullest]
            halves = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
            batches[fullest : fullest + 1] = halves
            tokens[fullest : fullest + 1] = [sum(self.lengths[i] for i in half) for half in halves]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return self.num_batches
