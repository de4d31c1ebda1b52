"""The prompt format: training examples supervise only the answers, evaluation prompts leave the last one out."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer

from phi3v.data.conversation import Conversation, Turn
from phi3v.data.samples import encode_conversation
from tests.conftest import noise_image


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
    conversation = Conversation([Turn("What colour is the shape?", "red", [noise_image()])])
    example = encode_conversation(tiny_processor, conversation, for_training=True)
    ids, labels = expected_turn(raw, tiny_processor, "\nWhat colour is the shape?", "red", [noise_image()])
    assert example["input_ids"].tolist() == ids
    assert example["labels"].tolist() == labels
    supervised = [raw.id_to_token(i) for i in example["labels"].tolist() if i != -100]
    assert supervised[-4:] == ["<|end|>", "▁", "\n", "<|endoftext|>"]
    assert raw.decode([i for i in labels if i != -100], skip_special_tokens=False).startswith("red")


def test_multi_turn_multi_image_example(tiny_processor, raw):
    images = [noise_image(seed=1), noise_image(120, 40, seed=2)]
    conversation = Conversation([Turn("Same colour?", "yes", images), Turn("Same shape?", "no")])
    example = encode_conversation(tiny_processor, conversation, for_training=True)
    ids1, labels1 = expected_turn(raw, tiny_processor, "\nSame colour?", "yes", images)
    ids2, labels2 = expected_turn(raw, tiny_processor, "Same shape?", "no", [])
    assert example["input_ids"].tolist() == ids1 + ids2
    assert example["labels"].tolist() == labels1 + labels2
    assert ids2[0] == raw.token_to_id("<s>")  # every turn's prompt carries its own <s>, as in the original
    assert example["pixel_values"].shape[0] == 2 and example["image_sizes"].shape == (2, 2)


def test_evaluation_prompt_is_the_training_example_without_the_last_answer(tiny_processor):
    conversation = Conversation([Turn("Same colour?", "yes", [noise_image()]), Turn("Same shape?", "no")])
    train = encode_conversation(tiny_processor, conversation, for_training=True)
    prompt = encode_conversation(tiny_processor, conversation, for_training=False)
    answer_length = int((train["labels"][-8:] != -100).sum())
    assert "labels" not in prompt
    assert torch.equal(prompt["input_ids"], train["input_ids"][:-answer_length])
    assert conversation.references() == ["no"]
