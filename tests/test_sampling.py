"""--group_by_length's order: a permutation, the same for the same (seed, epoch), little padding."""

from __future__ import annotations

import random

import pytest

from phi3v.sampling import LengthGroupedSampler, batched, length_grouped_order, padding_share


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


def test_the_sampler_follows_set_epoch():
    lengths = docvqa_like_lengths(64)
    sampler = LengthGroupedSampler(lengths, 4, seed=5)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == length_grouped_order(lengths, 4, 5, 1) != first
    assert len(sampler) == 64
