"""Metrics as the original defines them, and strided sharding that loses and duplicates nothing."""

import pytest

from phi3v.evaluation import accuracy, anls, auroc, restore_order, shard_indices


def test_anls_values():
    # NL = 1/3 for "abc" vs "abd": score 2/3; NL >= 0.5 scores 0; the best reference counts
    assert anls(["abc"], [["abd"]]) == pytest.approx(2 / 3)
    assert anls(["abcd"], [["wxyz", "abce"]]) == pytest.approx(0.75)
    assert anls(["ab"], [["cd"]]) == 0.0
    assert anls(["abc"], [["abcdef"]]) == 0.0  # NL = 0.5 is not below the threshold
    assert anls([" red. "], [["red"]]) == 1.0  # spaces and dots stripped
    assert anls(["Red"], [["red"]]) == pytest.approx(2 / 3)  # case-sensitive, as the original
    assert anls(["", "red"], [["red"], ["red"]]) == 0.5  # empty prediction scores 0


def test_accuracy_values():
    assert accuracy([" Yes.", "no", "maybe"], [["yes"], ["No"], ["no"]]) == pytest.approx(2 / 3)
    assert accuracy(["ApplyLipstick"], [["applylipstick"]]) == 1.0


@pytest.mark.parametrize("num_samples, world_size", [(5, 2), (7, 3), (2, 4), (8, 2), (1, 1), (10, 4)])
def test_shards_cover_every_sample_exactly_once(num_samples, world_size):
    """Strided, as the original's shards: sample i goes to rank i % world_size, in dataset order, so the shards'
    sizes differ by one at most (the first ranks take the extra samples)."""
    shards = [shard_indices(num_samples, rank, world_size) for rank in range(world_size)]
    gathered = [{"index": i} for shard in shards for i in shard]
    assert [r["index"] for r in restore_order(gathered, num_samples)] == list(range(num_samples))
    for rank, shard in enumerate(shards):
        assert shard == sorted(shard) and all(i % world_size == rank for i in shard), (rank, shard)
    sizes = [len(shard) for shard in shards]
    assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1, sizes


def test_shards_are_strided():
    assert [shard_indices(7, rank, 3) for rank in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [shard_indices(2, rank, 4) for rank in range(4)] == [[0], [1], [], []]  # more ranks than samples
    assert shard_indices(5, 0, 1) == [0, 1, 2, 3, 4]


def test_restore_order_refuses_lost_or_duplicated_samples():
    with pytest.raises(RuntimeError, match=r"lost samples \[2\]"):
        restore_order([{"index": 0}, {"index": 1}], 3)
    with pytest.raises(RuntimeError, match=r"twice \[1\]"):
        restore_order([{"index": 0}, {"index": 1}, {"index": 1}], 2)


def test_auroc_on_a_hand_made_case():
    # positives 0.9, 0.8, 0.4 against negatives 0.7, 0.1: 5 of the 6 pairs are ranked right
    assert auroc([0.9, 0.8, 0.4, 0.7, 0.1], [True, True, True, False, False]) == pytest.approx(5 / 6)
    assert auroc([0.5, 0.5], [True, False]) == 0.5  # a tie counts half
    assert auroc([0.2, 0.3, 0.3, 0.9], [False, True, False, True]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert auroc([0.1, 0.9], [False, True]) == 1.0 and auroc([0.1, 0.9], [True, False]) == 0.0
    assert auroc([0.3, 0.4], [True, True]) is None  # undefined without negatives
