"""Conversations, label masks, collators, the jsonl format and the synthetic hub schemas."""

from __future__ import annotations

import json
import random

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from phi3v.collators import EvalCollator, TrainCollator
from phi3v.data import (
    Conversation,
    ConversationDataset,
    Turn,
    encode_conversation,
    jsonl_conversation,
    load_cauldron_splits,
    load_jsonl_conversations,
)
from phi3v.synthetic import CAULDRON_FEATURES, DOCVQA_MINI_FEATURES, write_cauldron, write_docvqa


def image(width=90, height=60, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def raw(tiny_dir):
    return Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))


def expected_turn(raw, processor, user_after_tags: str, answer: str, images: list) -> tuple[list[int], list[int]]:
    """Spec §1.4-1.5 written out: the chat prompt chunks (each with <s>), -k placeholders, then the answer
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
    assert ids2[0] == raw.token_to_id("<s>")  # every turn's prompt carries its own <s> (spec §1.5)
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
    dataset = ConversationDataset(
        [("Which colour?", "red", 1), ("Is there a shape on the left of the image?", "no", 2)],
        lambda row: Conversation([Turn(row[0], row[1], [image(seed=row[2])])]),
        tiny_processor,
        for_training=True,
    )
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


def test_eval_collator_pads_left(tiny_processor):
    dataset = ConversationDataset(
        ["short", "a much longer question about the image"],
        lambda text: Conversation([Turn(text, "x", [image()])]),
        tiny_processor,
        for_training=False,
    )
    batch = EvalCollator(tiny_processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    short = len(dataset[0]["input_ids"])
    width = batch["input_ids"].shape[1]
    assert batch["attention_mask"][0].tolist() == [0] * (width - short) + [1] * short
    assert torch.equal(batch["input_ids"][0, width - short :], dataset[0]["input_ids"])
    assert batch["indices"] == [0, 1] and batch["answers"] == [["x"], ["x"]]


def test_collators_accept_text_only_examples(tiny_processor):
    dataset = ConversationDataset([0], lambda _: Conversation([Turn("hi", "hello")]), tiny_processor, True)
    batch = TrainCollator(tiny_processor.tokenizer.pad_token_id)([dataset[0]])
    assert "pixel_values" not in batch


# --- the jsonl format -----------------------------------------------------------------------------------------


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def test_jsonl_round_trip(tmp_path):
    (tmp_path / "images" / "a").mkdir(parents=True)
    image(seed=3).save(tmp_path / "images" / "a" / "0.jpg")
    record = {"id": "x", "source": "s", "conversations": [
        {"images": ["a/0.jpg"], "user": "What is it?", "assistant": "noise"},
        {"user": "Sure?", "assistant": "yes"},
    ]}  # fmt: skip
    write_jsonl(tmp_path / "train.jsonl", [record])
    records = load_jsonl_conversations(tmp_path / "train.jsonl", tmp_path / "images")
    conversation = jsonl_conversation(records[0])
    assert [t.user for t in conversation.turns] == ["What is it?", "Sure?"]
    assert len(conversation.turns[0].images) == 1 and conversation.turns[0].images[0].mode == "RGB"
    assert conversation.turns[1].images == []


def test_jsonl_problems_name_file_and_line(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"x")
    good_turn = {"images": [], "user": "q", "assistant": "a"}
    write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"conversations": [good_turn]},
            "{not json",
            {"conversations": []},
            {"conversations": [{"images": ["../secret.jpg"], "user": "q", "assistant": "a"}]},
            {"conversations": [{"images": ["missing.jpg"], "user": "q", "assistant": "a"}]},
            {"conversations": [{"user": "q"}]},
        ],
    )
    with pytest.raises(ValueError) as error:
        load_jsonl_conversations(tmp_path / "bad.jsonl", tmp_path / "images")
    message = str(error.value)
    assert "5 problem(s)" in message
    assert "bad.jsonl:2: not valid JSON" in message
    assert "bad.jsonl:3:" in message and "non-empty list" in message
    assert "bad.jsonl:4: turn 1: image path '../secret.jpg' leaves the image folder" in message
    assert "bad.jsonl:5: turn 1: image" in message and "does not exist" in message
    assert 'bad.jsonl:6: turn 1: "assistant" must be a string' in message


# --- synthetic data in the hub schemas -------------------------------------------------------------------------


def test_synthetic_docvqa_has_the_hub_schema(tmp_path):
    write_docvqa(tmp_path, num_train=6, num_test=3)
    train = datasets.load_dataset(str(tmp_path), split="train")
    test = datasets.load_dataset(str(tmp_path), split="test")
    assert train.features == DOCVQA_MINI_FEATURES and (len(train), len(test)) == (6, 3)
    row = train[0]
    assert set(row["query"]) == {"de", "en", "es", "fr", "it"} and isinstance(row["answers"], list)
    assert isinstance(row["image"], Image.Image)
    cauldron = datasets.load_dataset(str(tmp_path / "the_cauldron"), "docvqa", split="train")
    assert cauldron.features == CAULDRON_FEATURES
    assert set(cauldron[0]["texts"][0]) == {"user", "assistant", "source"}


@pytest.mark.parametrize("config, images_per_row", [("hateful_memes", 1), ("nlvr2", 2)])
def test_synthetic_cauldron_configs(tmp_path, config, images_per_row):
    write_cauldron(tmp_path, config, num_rows=12)
    train, held_out = load_cauldron_splits(str(tmp_path), config, eval_size=4, images_per_row=images_per_row)
    assert (len(train), len(held_out)) == (8, 4)
    assert train.features == CAULDRON_FEATURES
    assert all(len(row["images"]) == images_per_row for row in train)
    with pytest.raises(ValueError, match="Lower --eval_size"):
        load_cauldron_splits(str(tmp_path), config, eval_size=12)


def test_cauldron_rows_with_the_wrong_image_count_are_reported(tmp_path):
    write_cauldron(tmp_path, "hateful_memes", num_rows=6)
    with pytest.raises(ValueError, match=r"rows \[0, 1, 2, 3, 4, 5\] do not hold exactly 2 images"):
        load_cauldron_splits(str(tmp_path), "hateful_memes", eval_size=2, images_per_row=2)


def test_offline_hub_ids_fail_fast_with_the_way_out(monkeypatch):
    from phi3v.data import load_hub_dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="python -m phi3v.synthetic"):
        load_hub_dataset("nielsr/docvqa_1200_examples", None, "train", "--dataset_name_or_path", ["image"])


def test_local_folders_with_the_same_name_do_not_share_a_cache(tmp_path):
    """datasets alone would serve the second folder the first one's cached rows."""
    from phi3v.data import load_hub_dataset

    write_docvqa(tmp_path / "a" / "docvqa", num_train=3, num_test=1)
    write_docvqa(tmp_path / "b" / "docvqa", num_train=5, num_test=1)
    sizes = [len(load_hub_dataset(str(tmp_path / x / "docvqa"), None, "train", "--flag", ["image"])) for x in "ab"]
    assert sizes == [3, 5]
    write_docvqa(tmp_path / "a" / "docvqa", num_train=4, num_test=1)  # rewritten in place
    assert len(load_hub_dataset(str(tmp_path / "a" / "docvqa"), None, "train", "--flag", ["image"])) == 4


def test_bad_rows_are_reported_before_training(tmp_path):
    """An empty answer list would crash random.choice hours into a run; it is reported up front."""
    from phi3v.data import load_hub_dataset
    from phi3v.synthetic import _write_readme, _write_split, docvqa_mini_row

    rng = random.Random(0)
    rows = [docvqa_mini_row(i, rng) for i in range(4)]
    rows[2]["answers"] = []
    _write_split(rows, DOCVQA_MINI_FEATURES, tmp_path / "data" / "train-00000-of-00001.parquet")
    _write_readme(tmp_path, {"default": ["train"]})
    with pytest.raises(ValueError, match=r"1 bad row\(s\) in --flag .*\n  row 2: answers must be a non-empty list"):
        load_hub_dataset(str(tmp_path), None, "train", "--flag", ["image", "query", "answers"])
