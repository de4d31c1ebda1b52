"""--group_by_length's order: a permutation, the same for the same (seed, epoch), little padding."""

from __future__ import annotations

import random

import pytest

from phi3v.data.sampling import LengthGroupedSampler, batched, group_by_length, length_grouped_order, padding_share


def docvqa_like_lengths(count: int, seed: int = 0) -> list[int]:
    """Token counts of num_crops-16 samples: 16-crop letter pages, 12-crop A4 pages and photos, text varying."""
    rng = random.Random(seed)
    return [rng.choice([2509, 2509, 2509, 1933, 1921]) + rng.randint(20, 80) for _ in range(count)]


def test_the_order_is_a_permutation_fixed_by_seed_and_epoch():
    lengths = docvqa_like_lengths(503)
    order = length_grouped_order(lengths, 4, seed=3, epoch=1)
    assert sorted(order) == list(range(503))
    assert order == length_grouped_order(lengths, 4, seed=3, epoch=1)
    assert order != length_grouped_order(lengths, 4, seed=3, epoch=2)
    assert order != length_grouped_order(lengths, 4, seed=4, epoch=1)


def test_grouping_cuts_the_padding_of_a_random_order():
    lengths = docvqa_like_lengths(2000)
    shuffled = list(range(2000))
    random.Random(0).shuffle(shuffled)
    random_share = padding_share(batched(lengths, shuffled, 4))
    grouped_share = padding_share(batched(lengths, length_grouped_order(lengths, 4, seed=0), 4))
    assert random_share > 0.05
    assert grouped_share < 0.05
    assert grouped_share < random_share / 4


def test_the_micro_batch_with_the_longest_sample_comes_first():
    lengths = docvqa_like_lengths(400)
    order = length_grouped_order(lengths, 4, seed=1)
    assert max(lengths) in [lengths[i] for i in order[:4]]


def test_padding_share_counts_pad_tokens_over_all_tokens():
    assert padding_share([[10, 10], [4, 2]]) == pytest.approx(2 / 28)
    assert padding_share([[5, 5, 5]]) == 0


def test_the_sampler_orders_for_the_epoch_it_is_told_when_iteration_starts():
    lengths = docvqa_like_lengths(64)
    epoch = [0]
    sampler = LengthGroupedSampler(lengths, 4, seed=5, epoch=lambda: epoch[0])
    first = list(sampler)
    epoch[0] = 1
    assert list(sampler) == length_grouped_order(lengths, 4, 5, 1) != first
    assert len(sampler) == 64


def test_a_short_last_batch_holding_the_longest_sample_keeps_the_micro_batches_aligned():
    """202 samples in micro-batches of 4, the longest one last: the last micro-batch holds 2 samples, and
    only the longest sample moves to the front, so the loader, which cuts the order every 4 samples, still
    gets the sorted runs of the first mega-batch as its micro-batches."""
    lengths = [1000 + 3 * i for i in range(201)] + [50_000]  # distinct lengths: the sorted runs are known
    order = group_by_length(list(range(202)), lengths, 4)
    assert sorted(order) == list(range(202))
    runs = [sorted(range(200), key=lambda i: -lengths[i])[k : k + 4] for k in range(0, 200, 4)]
    cut = [order[k : k + 4] for k in range(0, 202, 4)]
    assert cut[0] == [201, *runs[0][1:]]
    assert cut[1:50] == runs[1:50]
    assert sorted(cut[50]) == sorted([runs[0][0], 200])
