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
from phi3v.data import Conversation, EvaluationSamples, TrainingSamples, Turn, encode_conversation, sample_rng
from phi3v.sources import RowSource, jsonl_conversation, load_cauldron_splits, read_conversations
from phi3v.synthetic import CAULDRON_FEATURES, DOCVQA_MINI_FEATURES, write_cauldron, write_docvqa


def list_source(rows: list) -> RowSource:
    return RowSource(rows, list(range(len(rows))), "test rows", "test", lambda row: [])


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


# --- the jsonl format -----------------------------------------------------------------------------------------


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def test_jsonl_round_trip(tmp_path, tiny_processor):
    (tmp_path / "images" / "a").mkdir(parents=True)
    image(seed=3).save(tmp_path / "images" / "a" / "0.jpg")
    record = {"id": "x", "source": "s", "conversations": [
        {"images": ["a/0.jpg"], "user": "What is it?", "assistant": "noise"},
        {"user": "Sure?", "assistant": "yes"},
    ]}  # fmt: skip
    write_jsonl(tmp_path / "train.jsonl", ["", record])
    source = read_conversations(tmp_path / "train.jsonl", tmp_path / "images")
    assert source.indices == [0] and source.where(0) == f"{tmp_path / 'train.jsonl'}:2"
    conversation = jsonl_conversation(source.rows[0])
    assert [t.user for t in conversation.turns] == ["What is it?", "Sure?"]
    assert conversation.turns[0].images == [str((tmp_path / "images" / "a" / "0.jpg").resolve())]
    assert conversation.turns[1].images == []
    example = encode_conversation(tiny_processor, conversation, for_training=True)
    assert example["pixel_values"].shape[0] == 1


def test_jsonl_problems_stay_with_their_line(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (tmp_path / "images" / "link.jpg").symlink_to(tmp_path / "secret.jpg")
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
            {"conversations": [{"images": [str(tmp_path / "secret.jpg")], "user": "q", "assistant": "a"}]},
            {"conversations": [{"images": ["link.jpg"], "user": "q", "assistant": "a"}]},
        ],
    )
    source = read_conversations(tmp_path / "bad.jsonl", tmp_path / "images")
    problems = {source.where(i): source.schema_problems(source.rows[i]) for i in source.indices}
    jsonl = tmp_path / "bad.jsonl"
    assert problems[f"{jsonl}:1"] == []
    assert problems[f"{jsonl}:2"][0].startswith("not valid JSON")
    assert "non-empty list" in problems[f"{jsonl}:3"][0]
    assert problems[f"{jsonl}:4"] == [
        f"turn 1: image path '../secret.jpg' leaves the image folder {tmp_path / 'images'}"
    ]
    assert "does not exist" in problems[f"{jsonl}:5"][0]
    assert problems[f"{jsonl}:6"] == ['turn 1: "assistant" must be a string']
    assert "leaves the image folder" in problems[f"{jsonl}:7"][0]  # an absolute path
    assert "leaves the image folder" in problems[f"{jsonl}:8"][0]  # a symlink pointing outside


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
    assert (train.indices, held_out.indices) == (list(range(4, 12)), [0, 1, 2, 3])
    assert train.where(4).endswith(f"(config {config}, split train) row 4")  # numbered as dataset[i]
    assert all(len(train.rows[i]["images"]) == images_per_row for i in train.indices)
    assert all(set(train.rows[i]["images"][0]) == {"bytes", "path"} for i in train.indices)  # not decoded
    assert not any(train.schema_problems(train.rows[i]) for i in train.indices)
    with pytest.raises(ValueError, match="Lower --eval_size"):
        load_cauldron_splits(str(tmp_path), config, eval_size=12)


def test_cauldron_rows_with_the_wrong_image_count_are_reported(tmp_path):
    write_cauldron(tmp_path, "hateful_memes", num_rows=6)
    train, _ = load_cauldron_splits(str(tmp_path), "hateful_memes", eval_size=2, images_per_row=2)
    assert train.schema_problems(train.rows[3]) == ["holds 1 image(s), this recipe needs exactly 2"]


def test_offline_hub_ids_fail_fast_with_the_way_out(monkeypatch):
    from phi3v.sources import load_hub_dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="python -m phi3v.synthetic"):
        load_hub_dataset("nielsr/docvqa_1200_examples", None, "train", "--dataset_name_or_path", ["image"])


def test_local_folders_with_the_same_name_do_not_share_a_cache(tmp_path):
    """datasets alone would serve the second folder the first one's cached rows."""
    from phi3v.sources import load_hub_dataset

    write_docvqa(tmp_path / "a" / "docvqa", num_train=3, num_test=1)
    write_docvqa(tmp_path / "b" / "docvqa", num_train=5, num_test=1)
    sizes = [len(load_hub_dataset(str(tmp_path / x / "docvqa"), None, "train", "--flag", ["image"])) for x in "ab"]
    assert sizes == [3, 5]
    write_docvqa(tmp_path / "a" / "docvqa", num_train=4, num_test=1)  # rewritten in place
    assert len(load_hub_dataset(str(tmp_path / "a" / "docvqa"), None, "train", "--flag", ["image"])) == 4


def test_hub_row_schema_problems(tmp_path):
    """An empty answer list would crash the builder hours into a run; the row check names it."""
    from phi3v.sources import load_hub_source
    from phi3v.synthetic import _write_readme, _write_split, docvqa_mini_row

    rng = random.Random(0)
    rows = [docvqa_mini_row(i, rng) for i in range(4)]
    rows[2]["answers"] = []
    rows[3]["query"] = {"de": "Was?"}
    _write_split(rows, DOCVQA_MINI_FEATURES, tmp_path / "data" / "train-00000-of-00001.parquet")
    _write_readme(tmp_path, {"default": ["train"]})
    source = load_hub_source(str(tmp_path), None, "train", "--flag", ["image", "query", "answers"])
    assert [source.schema_problems(source.rows[i]) for i in range(4)] == [
        [],
        [],
        ["answers must be a non-empty list of strings"],
        ["query needs a string 'en'"],
    ]
