"""Metrics as the original defines them, and sharding that loses and duplicates nothing."""

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v.data.conversation import ANSWER_SUFFIX, Conversation, Turn
from phi3v.data.samples import EvaluationSamples
from phi3v.data.sources import RowSource
from phi3v.evaluation import accuracy, anls, auroc, restore_order, shard_indices
from phi3v.likelihood import label_log_likelihoods


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


def test_auroc_on_a_hand_made_case():
    # positives 0.9, 0.8, 0.4 against negatives 0.7, 0.1: 5 of the 6 pairs are ranked right
    assert auroc([0.9, 0.8, 0.4, 0.7, 0.1], [True, True, True, False, False]) == pytest.approx(5 / 6)
    assert auroc([0.5, 0.5], [True, False]) == 0.5  # a tie counts half
    assert auroc([0.2, 0.3, 0.3, 0.9], [False, True, False, True]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert auroc([0.1, 0.9], [False, True]) == 1.0 and auroc([0.1, 0.9], [True, False]) == 0.0
    assert auroc([0.3, 0.4], [True, True]) is None  # undefined without negatives


def test_label_likelihoods_equal_a_plain_forward_pass(tiny_model, tiny_processor):
    """Left padding, position ids, images repeated per label and the kept logits give exactly what one
    unpadded forward pass per sample and label gives."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((90, 60), (40, 120))]
    conversations = [
        Conversation([Turn("Is it red?", "", [images[0]])]),
        Conversation([Turn("A much longer question about the second picture?", "", [images[1]])]),
        Conversation([Turn("No image here.", "", [])]),
    ]
    source = RowSource.of(conversations, "test")
    dataset = EvaluationSamples(source, source.indices, lambda c: c, tiny_processor)
    labels = ["yes", "no", "not at all"]
    scored = label_log_likelihoods(tiny_model, tiny_processor, dataset, [0, 1, 2], labels, batch_size=2)
    assert [r["index"] for r in scored] == [0, 1, 2]
    for result in scored:
        example = dataset[result["index"]]
        for label, score in zip(labels, result["scores"]):
            answer = tiny_processor.tokenizer(label + ANSWER_SUFFIX, add_special_tokens=False).input_ids
            ids = torch.cat([example["input_ids"], torch.tensor(answer)])[None]
            images_in = {k: example[k] for k in ("pixel_values", "image_sizes") if k in example}
            with torch.no_grad():
                log_probs = tiny_model(input_ids=ids, **images_in).logits[0].log_softmax(-1)
            start = len(example["input_ids"])
            expected = sum(log_probs[start + j - 1, token].item() for j, token in enumerate(answer))
            assert score == pytest.approx(expected, abs=1e-4)
