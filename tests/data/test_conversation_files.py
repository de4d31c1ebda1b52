"""The conversation files: the cookbook's jsonl and LLaVA JSON, read line by line with each problem kept with
its line."""

from __future__ import annotations

import json

import pytest

from phi3v.data.conversation_files import jsonl_conversation, read_conversations
from phi3v.data.samples import encode_conversation
from phi3v.data.synthetic import write_custom
from phi3v.errors import RecipeError
from tests.conftest import noise_image

# --- the jsonl format -----------------------------------------------------------------------------------------


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def test_jsonl_round_trip(tmp_path, tiny_processor):
    (tmp_path / "images" / "a").mkdir(parents=True)
    noise_image(seed=3).save(tmp_path / "images" / "a" / "0.jpg")
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
