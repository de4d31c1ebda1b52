"""Conversations, label masks, collators, the jsonl format and the synthetic hub schemas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from phi3v.data.collators import EvalCollator, TrainCollator
from phi3v.data.conversation import Conversation, Turn
from phi3v.data.samples import EvaluationSamples, TrainingSamples, encode_conversation, sample_rng
from phi3v.data.sources import RowSource


def list_source(rows: list) -> RowSource:
    return RowSource(rows, list(range(len(rows))), "test rows", "test", lambda row: [])


def image(width=90, height=60, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def raw(tiny_dir):
    return Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))


def expected_turn(raw, processor, user_after_tags: str, answer: str, images: list) -> tuple[list[int], list[int]]:
    """The original scripts' prompt format written out:
    the chat prompt chunks (each with <s>), -k placeholders, then the answer
    tokenized without special tokens; only the answer is supervised."""
    counts = processor.image_processor(images)["num_img_tokens"] if images else []
    tags = "".join(f"<|image_{k}|>" for k in range(1, len(images) + 1))
    head = "<|user|>\n"
    tail = f"{user_after_tags}<|end|>\n<|assistant|>\n"
    if images:
        prompt = raw.encode(head).ids
        for k, count in enumerate(counts, start=1):
            prompt += [-k] * count
            prompt += raw.encode("" if k < len(images) else tail).ids
    else:
        prompt = raw.encode(head + tail).ids
    assert tags or not images
    answer_ids = raw.encode(answer + "<|end|>\n<|endoftext|>", add_special_tokens=False).ids
    return prompt + answer_ids, [-100] * len(prompt) + answer_ids


def test_training_example_masks_everything_but_the_answer(tiny_processor, raw):
    conversation = Conversation([Turn("What colour is the shape?", "red", [image()])])
    example = encode_conversation(tiny_processor, conversation, for_training=True)
    ids, labels = expected_turn(raw, tiny_processor, "\nWhat colour is the shape?", "red", [image()])
    assert example["input_ids"].tolist() == ids
    assert example["labels"].tolist() == labels
    supervised = [raw.id_to_token(i) for i in example["labels"].tolist() if i != -100]
    assert supervised[-4:] == ["<|end|>", "▁", "\n", "<|endoftext|>"]
    assert raw.decode([i for i in labels if i != -100], skip_special_tokens=False).startswith("red")


def test_multi_turn_multi_image_example(tiny_processor, raw):
    images = [image(seed=1), image(120, 40, seed=2)]
    conversation = Conversation([Turn("Same colour?", "yes", images), Turn("Same shape?", "no")])
    example = encode_conversation(tiny_processor, conversation, for_training=True)
    ids1, labels1 = expected_turn(raw, tiny_processor, "\nSame colour?", "yes", images)
    ids2, labels2 = expected_turn(raw, tiny_processor, "Same shape?", "no", [])
    assert example["input_ids"].tolist() == ids1 + ids2
    assert example["labels"].tolist() == labels1 + labels2
    assert ids2[0] == raw.token_to_id("<s>")  # every turn's prompt carries its own <s>, as in the original
    assert example["pixel_values"].shape[0] == 2 and example["image_sizes"].shape == (2, 2)


def test_evaluation_prompt_is_the_training_example_without_the_last_answer(tiny_processor):
    conversation = Conversation([Turn("Same colour?", "yes", [image()]), Turn("Same shape?", "no")])
    train = encode_conversation(tiny_processor, conversation, for_training=True)
    prompt = encode_conversation(tiny_processor, conversation, for_training=False)
    answer_length = int((train["labels"][-8:] != -100).sum())
    assert "labels" not in prompt
    assert torch.equal(prompt["input_ids"], train["input_ids"][:-answer_length])
    assert conversation.references() == ["no"]


def test_train_collator_pads_right_and_keeps_the_final_endoftext(tiny_processor):
    rows = [("Which colour?", "red", 1), ("Is there a shape on the left of the image?", "no", 2)]
    dataset = TrainingSamples(
        list_source(rows), [0, 1], lambda row: Conversation([Turn(row[0], row[1], [image(seed=row[2])])]),
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
        lambda text: Conversation([Turn(text, "x", [image()])]),
        tiny_processor,
    )
    batch = EvalCollator(tiny_processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    short = len(dataset[0]["input_ids"])
    width = batch["input_ids"].shape[1]
    assert batch["attention_mask"][0].tolist() == [0] * (width - short) + [1] * short
    assert torch.equal(batch["input_ids"][0, width - short :], dataset[0]["input_ids"])
    assert batch["indices"] == [0, 1] and batch["answers"] == [["x"], ["x"]]


def test_collators_accept_text_only_examples(tiny_processor):
    dataset = TrainingSamples(list_source([0]), [0], lambda _: Conversation([Turn("hi", "hello")]), tiny_processor, 0)
    batch = TrainCollator(tiny_processor.tokenizer.pad_token_id)([dataset[0]])
    assert "pixel_values" not in batch


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
