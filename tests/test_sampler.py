"""Sample order: a function of (seed, epoch) only; length grouping; token-budget batches."""

from __future__ import annotations

import pytest

from phivision.data.sampler import GROUP_WINDOW_BATCHES, EpochShuffleSampler, TokenBudgetBatchSampler
from phivision.errors import PhivisionError


def test_order_depends_on_seed_and_epoch_only():
    first, second = EpochShuffleSampler(100, seed=7), EpochShuffleSampler(100, seed=7)
    assert list(first) == list(second) and sorted(first) == list(range(100))
    first.set_epoch(1)
    assert list(first) != list(second)
    second.set_epoch(1)
    assert list(first) == list(second)
    assert list(EpochShuffleSampler(100, seed=8)) != list(EpochShuffleSampler(100, seed=7))


def test_length_grouping_sorts_within_windows_and_keeps_every_sample():
    lengths = [(i * 37) % 101 for i in range(300)]
    sampler = EpochShuffleSampler(300, seed=0, lengths=lengths, batch_size=2)
    order = list(sampler)
    assert sorted(order) == list(range(300))
    window = 2 * GROUP_WINDOW_BATCHES
    for start in range(0, 300, window):
        chunk = [lengths[i] for i in order[start : start + window]]
        assert chunk == sorted(chunk, reverse=True)


def test_token_budget_batches_fit_the_budget_and_cover_every_sample_once():
    lengths = [5, 30, 12, 7, 40, 3, 9, 22, 18, 1] * 5
    sampler = TokenBudgetBatchSampler(EpochShuffleSampler(len(lengths), seed=3), lengths, max_tokens=35)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        total = sum(lengths[i] for i in batch)
        assert total <= 35 or len(batch) == 1  # the 40-token sample stands alone
    assert any(len(batch) == 1 and lengths[batch[0]] == 40 for batch in batches)
    assert len(sampler) == len(batches)
    order = [i for batch in batches for i in batch]
    assert order == list(EpochShuffleSampler(len(lengths), seed=3))


def varied_lengths(count: int) -> list[int]:
    return [(i * 53) % 90 + 10 for i in range(count)]


def epoch_batches(sampler: TokenBudgetBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_token_budget_gives_every_epoch_the_same_whole_number_of_optimiser_steps():
    """Greedy packing alone gave 23/21/20/20 micro-batches over four epochs; the Trainer plans with the first."""
    lengths = varied_lengths(120)
    greedy = TokenBudgetBatchSampler(EpochShuffleSampler(120, seed=1), lengths, max_tokens=300)
    assert len({len(epoch_batches(greedy, epoch)) for epoch in range(4)}) > 1  # the data does vary per epoch
    sampler = TokenBudgetBatchSampler(EpochShuffleSampler(120, seed=1), lengths, max_tokens=300,
                                      batch_multiple=6, epochs=4)
    assert len(sampler) % 6 == 0
    for epoch in range(4):
        batches = epoch_batches(sampler, epoch)
        assert len(batches) == len(sampler)
        assert [i for batch in batches for i in batch] == EpochShuffleSampler(120, seed=1).order(epoch)
        assert all(sum(lengths[i] for i in batch) <= 300 for batch in batches)
    assert epoch_batches(sampler, 2) == epoch_batches(sampler, 2)


def test_token_budget_with_max_steps_covers_every_epoch_the_steps_reach():
    lengths = varied_lengths(120)
    sampler = TokenBudgetBatchSampler(EpochShuffleSampler(120, seed=1), lengths, max_tokens=300,
                                      batch_multiple=4, max_steps=30)
    epochs = -(-30 * 4 // len(sampler))
    greedy = TokenBudgetBatchSampler(EpochShuffleSampler(120, seed=1), lengths, max_tokens=300)
    assert len(sampler) >= max(len(epoch_batches(greedy, epoch)) for epoch in range(epochs))


def test_token_budget_refuses_more_micro_batches_than_samples():
    with pytest.raises(PhivisionError, match="max_tokens_per_batch=100: 10 samples cannot fill 12 micro-batches"):
        TokenBudgetBatchSampler(EpochShuffleSampler(10, seed=0), [60] * 10, max_tokens=100, batch_multiple=4)
