"""Batching: right padding for training, left padding for generation, pixels in example order."""

from __future__ import annotations

import torch

from phi3v.data.collators import EvalCollator, TrainCollator
from phi3v.data.conversation import Conversation, Turn
from phi3v.data.samples import EvaluationSamples, TrainingSamples
from tests.conftest import list_source, noise_image


def test_train_collator_pads_right_and_keeps_the_final_endoftext(tiny_processor):
    rows = [("Which colour?", "red", 1), ("Is there a shape on the left of the image?", "no", 2)]
    dataset = TrainingSamples(
        list_source(rows), [0, 1], lambda row: Conversation([Turn(row[0], row[1], [noise_image(seed=row[2])])]),
        tiny_processor, seed=0,
    )  # fmt: skip
    examples = [dataset[0], dataset[1]]
    pad_id = tiny_processor.tokenizer.pad_token_id
    batch = TrainCollator(pad_id)(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    width = max(lengths)
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (width - length)
        assert batch["input_ids"][row, length:].eq(pad_id).all()
        assert batch["labels"][row, length:].eq(-100).all()
        # the answer's closing <|endoftext|> is the pad token, yet it stays attended and supervised
        assert batch["input_ids"][row, length - 1] == pad_id
        assert batch["attention_mask"][row, length - 1] == 1 and batch["labels"][row, length - 1] == pad_id
    assert torch.equal(batch["pixel_values"], torch.cat([e["pixel_values"] for e in examples]))
    assert batch["rows"] == [0, 1]


def test_eval_collator_pads_left(tiny_processor):
    dataset = EvaluationSamples(
        list_source(["short", "a much longer question about the image"]),
        [0, 1],
        lambda text: Conversation([Turn(text, "x", [noise_image()])]),
        tiny_processor,
    )
    batch = EvalCollator(tiny_processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    short = len(dataset[0]["input_ids"])
    width = batch["input_ids"].shape[1]
    assert batch["attention_mask"][0].tolist() == [0] * (width - short) + [1] * short
    assert torch.equal(batch["input_ids"][0, width - short :], dataset[0]["input_ids"])
    assert batch["indices"] == [0, 1] and batch["answers"] == [["x"], ["x"]]


def test_collators_accept_text_only_examples(tiny_processor):
    """Two text-only examples of different lengths: padded as with images, and no pixel keys at all."""
    pad_id = tiny_processor.tokenizer.pad_token_id
    turns = {0: Turn("hi", "hello"), 1: Turn("What is the capital of France, please?", "Paris, of course")}
    train = TrainingSamples(list_source([0, 1]), [0, 1], lambda row: Conversation([turns[row]]), tiny_processor, 0)
    examples = [train[0], train[1]]
    ids = [e["input_ids"].tolist() for e in examples]
    labels = [e["labels"].tolist() for e in examples]
    short, long = len(ids[0]), len(ids[1])
    assert short < long and all(-100 in row and any(t != -100 for t in row) for row in labels)
    batch = TrainCollator(pad_id)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "rows"}
    assert batch["input_ids"].tolist() == [ids[0] + [pad_id] * (long - short), ids[1]]
    assert batch["labels"].tolist() == [labels[0] + [-100] * (long - short), labels[1]]
    assert batch["attention_mask"].tolist() == [[1] * short + [0] * (long - short), [1] * long]
    assert batch["rows"] == [0, 1]

    evaluation = EvaluationSamples(list_source([0, 1]), [0, 1], lambda row: Conversation([turns[row]]), tiny_processor)
    prompts = [evaluation[0], evaluation[1]]
    ids = [p["input_ids"].tolist() for p in prompts]
    short, long = len(ids[0]), len(ids[1])
    assert short < long
    batch = EvalCollator(pad_id)(prompts)
    assert set(batch) == {"input_ids", "attention_mask", "indices", "answers"}
    assert batch["input_ids"].tolist() == [[pad_id] * (long - short) + ids[0], ids[1]]
    assert batch["attention_mask"].tolist() == [[0] * (long - short) + [1] * short, [1] * long]
    assert batch["indices"] == [0, 1] and batch["answers"] == [["hello"], ["Paris, of course"]]
