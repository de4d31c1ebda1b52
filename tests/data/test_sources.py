"""Row sources: hub datasets and local mirrors, the cookbook's jsonl and LLaVA JSON files."""

from __future__ import annotations

import json
import random

import datasets
import numpy as np
import pytest
from PIL import Image

from phi3v.data.conversation_files import jsonl_conversation, read_conversations
from phi3v.data.samples import encode_conversation
from phi3v.data.sources import load_cauldron_splits
from phi3v.data.synthetic import (
    CAULDRON_FEATURES,
    DOCVQA_MINI_FEATURES,
    as_llava,
    write_cauldron,
    write_custom,
    write_docvqa,
)
from phi3v.errors import RecipeError


def image(width=90, height=60, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


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
    with pytest.raises(RecipeError, match="Lower --eval_size"):
        load_cauldron_splits(str(tmp_path), config, eval_size=12)


def test_cauldron_rows_with_the_wrong_image_count_are_reported(tmp_path):
    write_cauldron(tmp_path, "hateful_memes", num_rows=6)
    train, _ = load_cauldron_splits(str(tmp_path), "hateful_memes", eval_size=2, images_per_row=2)
    assert train.schema_problems(train.rows[3]) == ["holds 1 image(s), this recipe needs exactly 2"]


def test_offline_hub_ids_fail_fast_with_the_way_out(monkeypatch):
    from phi3v.data.sources import load_hub_dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError, match="python -m phi3v.synthetic"):
        load_hub_dataset("nielsr/docvqa_1200_examples", None, "train", "--dataset_name_or_path", ["image"])


def test_local_folders_with_the_same_name_do_not_share_a_cache(tmp_path):
    """datasets alone would serve the second folder the first one's cached rows."""
    from phi3v.data.sources import load_hub_dataset

    write_docvqa(tmp_path / "a" / "docvqa", num_train=3, num_test=1)
    write_docvqa(tmp_path / "b" / "docvqa", num_train=5, num_test=1)
    sizes = [len(load_hub_dataset(str(tmp_path / x / "docvqa"), None, "train", "--flag", ["image"])) for x in "ab"]
    assert sizes == [3, 5]
    write_docvqa(tmp_path / "a" / "docvqa", num_train=4, num_test=1)  # rewritten in place
    assert len(load_hub_dataset(str(tmp_path / "a" / "docvqa"), None, "train", "--flag", ["image"])) == 4


def test_a_local_folder_rewritten_in_place_gets_a_new_fingerprint(tmp_path):
    """datasets' own fingerprint names the folder, not what it holds: a mirror regenerated with other rows under
    the same file names kept it, and the validation cache then served the old folder's result."""
    from phi3v.data.sources import load_hub_source

    def fingerprint() -> str:
        return load_hub_source(str(tmp_path / "docvqa"), None, "train", "--flag", ["image"]).fingerprint

    write_docvqa(tmp_path / "docvqa", num_train=4, num_test=1, seed=1)
    first = fingerprint()
    assert fingerprint() == first  # read again, unchanged
    write_docvqa(tmp_path / "docvqa", num_train=4, num_test=1, seed=2)  # same names, other content
    assert fingerprint() != first


def test_a_copy_of_the_data_has_the_same_identity_but_is_validated_again(tmp_path):
    """A checkpoint records the identity (names and sizes, a file's text): a copy made later, elsewhere, resumes;
    the validation cache follows the stricter fingerprint (modification times too)."""
    import shutil

    from phi3v.data.sources import load_hub_source

    write_docvqa(tmp_path / "docvqa", num_train=4, num_test=1)
    write_custom(tmp_path / "custom", num_train=4, num_eval=1)
    for name in ("docvqa", "custom"):
        shutil.copytree(tmp_path / name, tmp_path / "copy" / name, copy_function=shutil.copyfile)  # new times
    (tmp_path / "docvqa" / ".git").mkdir()
    (tmp_path / "docvqa" / ".git" / "index").write_text("not data")  # hidden: not part of the data
    hub = [
        load_hub_source(str(root / "docvqa"), None, "train", "--flag", ["image"])
        for root in (tmp_path, tmp_path / "copy")
    ]
    files = [
        read_conversations(root / "custom" / "train.jsonl", root / "custom") for root in (tmp_path, tmp_path / "copy")
    ]
    for original, copy in (hub, files):
        assert original.identity == copy.identity and original.fingerprint != copy.fingerprint


def test_hub_row_schema_problems(tmp_path):
    """An empty answer list would crash the builder hours into a run; the row check names it."""
    from phi3v.data.sources import load_hub_source
    from phi3v.data.synthetic import _write_readme, _write_split, docvqa_mini_row

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


# --- LLaVA-style JSON -------------------------------------------------------------------------------------------


def test_both_formats_give_the_same_conversations(tmp_path):
    """python -m phi3v.synthetic custom writes every sample in both formats: they read back the same,
    multi-turn and multi-image samples and text-only ones included."""
    write_custom(tmp_path, num_train=12, num_eval=2)
    cookbook = read_conversations(tmp_path / "train.jsonl", tmp_path)
    llava = read_conversations(tmp_path / "train.json", tmp_path)
    as_conversations = [[jsonl_conversation(source.rows[i]) for i in source.indices] for source in (cookbook, llava)]
    assert as_conversations[0] == as_conversations[1]
    shapes = {(len(c.turns), tuple(len(t.images) for t in c.turns)) for c in as_conversations[0]}
    assert {(1, (1,)), (1, (0,)), (2, (2, 0))} <= shapes
    assert llava.where(1) == f"{tmp_path / 'train.json'}:{_line_of_record(tmp_path / 'train.json', 1)} (record 1)"


def _line_of_record(path, number: int) -> int:
    """The line where record ``number`` of an indented JSON list opens (its '{' at indent 1)."""
    openings = [i for i, line in enumerate(path.read_text().splitlines(), start=1) if line == " {"]
    return openings[number]


def test_llava_placeholders_go_with_their_turn(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.jpg").write_bytes(b"")
    records = [
        {"id": "x", "images": ["a.jpg", "b.jpg"], "conversations": [
            {"from": "human", "value": "<image>\nFirst?"}, {"from": "gpt", "value": "one"},
            {"from": "human", "value": "And <image> this?"}, {"from": "gpt", "value": "two"}]},
        {"image": "a.jpg", "conversations": [
            {"from": "human", "value": "No placeholder"}, {"from": "gpt", "value": "ok"}]},
        {"images": ["a.jpg"], "conversations": [
            {"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]},
        {"conversations": [{"from": "gpt", "value": "answer first"}, {"from": "human", "value": "?"}]},
        {"conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "fine"}]},
    ]  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps(records))
    source = read_conversations(tmp_path / "data.json", tmp_path)
    first = jsonl_conversation(source.rows[0])
    assert [(t.user, len(t.images), t.assistant) for t in first.turns] == [
        ("First?", 1, "one"),
        ("And this?", 1, "two"),
    ]
    assert [len(t.images) for t in jsonl_conversation(source.rows[1]).turns] == [1]  # all images to the first turn
    assert source.schema_problems(source.rows[2]) == ["2 <image> placeholder(s) for 1 image(s)"]
    assert "must alternate" in source.schema_problems(source.rows[3])[0]
    assert jsonl_conversation(source.rows[4]).turns[0].images == []


def test_a_line_that_is_not_utf8_is_a_bad_sample_with_its_line(tmp_path):
    good = json.dumps({"conversations": [{"images": [], "user": "q", "assistant": "a"}]}).encode()
    latin1 = (
        json.dumps({"conversations": [{"images": [], "user": "café", "assistant": "a"}]})
        .encode()
        .replace(b"\\u00e9", b"\xe9")
    )  # "café" as Latin-1 bytes, not UTF-8
    (tmp_path / "train.jsonl").write_bytes(b"\n".join([good, latin1, good]) + b"\n")
    source = read_conversations(tmp_path / "train.jsonl", tmp_path)
    problems = [source.schema_problems(source.rows[i]) for i in source.indices]
    assert problems[0] == problems[2] == []
    assert problems[1] == [f"not UTF-8 text (byte 0xe9 at byte {latin1.index(0xE9) + 1} of the line): save the file "
                           "as UTF-8"]  # fmt: skip
    assert source.where(1) == f"{tmp_path / 'train.jsonl'}:2"

    records = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": v}]} for v in "ab"]
    text = json.dumps(records, indent=1).encode().replace(b'"b"', b'"\xff"')
    (tmp_path / "data.json").write_bytes(text)
    llava = read_conversations(tmp_path / "data.json", tmp_path)
    line = text[: text.index(b"\xff")].count(b"\n") + 1
    assert llava.schema_problems(llava.rows[0]) == []
    assert llava.schema_problems(llava.rows[1])[0].startswith(f"line {line}: not UTF-8 text (byte 0xff at byte ")


@pytest.mark.parametrize("name", ["train.json", "train.jsonl"])
def test_a_byte_order_mark_is_fine_in_both_formats(tmp_path, name):
    write_custom(tmp_path, num_train=4, num_eval=1)
    plain = read_conversations(tmp_path / name, tmp_path)
    (tmp_path / f"bom-{name}").write_bytes(b"\xef\xbb\xbf" + (tmp_path / name).read_bytes())
    with_bom = read_conversations(tmp_path / f"bom-{name}", tmp_path)
    assert [with_bom.schema_problems(row) for row in with_bom.rows] == [[]] * 4
    assert [jsonl_conversation(row) for row in with_bom.rows] == [jsonl_conversation(row) for row in plain.rows]


def test_a_broken_llava_file_names_its_line(tmp_path):
    (tmp_path / "data.json").write_text('[\n {"conversations": []},\n {"oops" 5}\n]')
    with pytest.raises(RecipeError, match=r"data.json:3:\d+: not valid JSON"):
        read_conversations(tmp_path / "data.json", tmp_path)


def test_llava_records_become_cookbook_records():
    record = {
        "id": "r",
        "source": "s",
        "conversations": [{"images": ["a.jpg", "b.jpg"], "user": "q", "assistant": "a"}],
    }
    assert as_llava(record) == {
        "id": "r",
        "images": ["a.jpg", "b.jpg"],
        "conversations": [{"from": "human", "value": "<image>\n<image>\nq"}, {"from": "gpt", "value": "a"}],
    }
