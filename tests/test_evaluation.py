"""Metrics as the original defines them, and sharding that loses and duplicates nothing."""

import pytest

from phi3v.evaluation import accuracy, anls, restore_order, shard_indices


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


@pytest.mark.parametrize("num_samples, world_size", [(5, 2), (7, 3), (2, 4), (8, 2), (1, 1)])
def test_shards_cover_every_sample_exactly_once(num_samples, world_size):
    shards = [shard_indices(num_samples, rank, world_size) for rank in range(world_size)]
    gathered = [{"index": i} for shard in shards for i in shard]
    assert [r["index"] for r in restore_order(gathered, num_samples)] == list(range(num_samples))


def test_restore_order_refuses_lost_or_duplicated_samples():
    with pytest.raises(RuntimeError, match=r"lost samples \[2\]"):
        restore_order([{"index": 0}, {"index": 1}], 3)
    with pytest.raises(RuntimeError, match=r"twice \[1\]"):
        restore_order([{"index": 0}, {"index": 1}, {"index": 1}], 2)
