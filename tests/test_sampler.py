"""Sample order: a function of (seed, epoch) only; length grouping; token-budget batches."""

from __future__ import annotations

from phivision.data.sampler import GROUP_WINDOW_BATCHES, EpochShuffleSampler, TokenBudgetBatchSampler


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
