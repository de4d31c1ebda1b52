"""The training and evaluation datasets: the random choices of a row, one candidate drawn per epoch."""

from __future__ import annotations

from phi3v.data.conversation import Conversation, Turn
from phi3v.data.samples import TrainingSamples, sample_rng
from tests.conftest import list_source


def test_sample_choices_depend_only_on_seed_epoch_and_row():
    choices = [sample_rng(7, epoch, row).random() for epoch in range(2) for row in range(3)]
    assert choices == [sample_rng(7, epoch, row).random() for epoch in range(2) for row in range(3)]
    assert len(set(choices)) == 6 and sample_rng(8, 0, 0).random() != choices[0]


def test_training_samples_draw_one_candidate_per_epoch(tiny_processor):
    candidates = [Conversation([Turn("q", answer)]) for answer in ("alpha", "beta", "gamma", "delta")]
    dataset = TrainingSamples(list_source([0]), [0], lambda _: candidates, tiny_processor, seed=3)
    drawn = []
    for epoch in range(12):
        dataset.set_epoch(epoch)
        labels = [t for t in dataset[0]["labels"].tolist() if t != -100]
        drawn.append(tiny_processor.tokenizer.decode(labels, skip_special_tokens=True).strip())
        assert dataset[0]["labels"].tolist() == dataset[0]["labels"].tolist()  # the same within an epoch
    assert len(set(drawn)) > 1 and set(drawn) <= {"alpha", "beta", "gamma", "delta"}
