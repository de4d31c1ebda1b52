"""The synthetic datasets: read by datasets like their hub repositories, reproducible from their seed, and
answerable from the image alone (the colour and the shape in every answer are the ones drawn)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import av
import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from phi3v.data.synthetic import (
    CAULDRON_FEATURES,
    COLOURS,
    DOCVQA_COLOUR_QUESTION,
    DOCVQA_MINI_FEATURES,
    DOCVQA_SHAPE_QUESTION,
    HATEFUL_QUESTION,
    SHAPES,
    UCF101_CLASSES,
    UCF101_COLOURS,
    WORDS,
    as_llava,
    write_cauldron,
    write_custom,
    write_docvqa,
    write_ucf101,
)
from phi3v.synthetic import main as synthetic

FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}  # of its bounding box


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def colour_mask(image: Image.Image, rgb, tolerance: int = 0) -> np.ndarray:
    return (np.abs(pixels(image) - np.array(rgb)) <= tolerance).all(-1)


def drawn_colour(image: Image.Image, tolerance: int = 0) -> str:
    """The palette colour covering most of the image (the shape; backgrounds and text are greys)."""
    counts = {name: colour_mask(image, rgb, tolerance).sum() for name, rgb in COLOURS.items()}
    name = max(counts, key=counts.get)
    assert counts[name] > 1000, counts  # a large shape, not a few stray pixels
    return name


def drawn_shape(image: Image.Image, colour: str) -> str:
    """Told apart by how much of its bounding box the shape fills."""
    ys, xs = np.nonzero(colour_mask(image, COLOURS[colour]))
    fill = len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    return min(FILL, key=lambda shape: abs(FILL[shape] - fill))


def load(folder: Path, config: str | None, split: str, cache: Path):
    return datasets.load_dataset(str(folder), config, split=split, cache_dir=str(cache))


def parquet_rows(folder: Path) -> dict[str, list[dict]]:
    return {str(p.relative_to(folder)): pq.read_table(p).to_pylist() for p in sorted(folder.rglob("*.parquet"))}


# --- DocVQA ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docvqa(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("docvqa")
    write_docvqa(folder, num_train=12, num_test=4, seed=3)
    return folder


def test_docvqa_reads_like_the_hub_repositories(docvqa, tmp_path):
    train, test = load(docvqa, None, "train", tmp_path), load(docvqa, None, "test", tmp_path)
    assert train.features == DOCVQA_MINI_FEATURES and (len(train), len(test)) == (12, 4)
    assert [row["id"] for row in test] == [f"synthetic_{i}" for i in range(12, 16)]  # ids go on across splits
    cauldron = load(docvqa / "the_cauldron", "docvqa", "train", tmp_path)
    assert cauldron.features == CAULDRON_FEATURES and len(cauldron) == 12
    readme = (docvqa / "README.md").read_text()
    assert readme.startswith("---\nconfigs:\n- config_name: default\n")
    assert "path: data/train-*" in readme and "path: data/test-*" in readme


def test_docvqa_answers_are_what_is_drawn(docvqa, tmp_path):
    rows = list(load(docvqa, None, "train", tmp_path)) + list(load(docvqa, None, "test", tmp_path))
    asked = set()
    for row in rows:
        question = row["query"]["en"]
        assert set(row["query"].values()) == {question}
        (answer,) = row["answers"]
        assert row["answer"]["text"] == answer and row["words"][0].lower() in WORDS
        colour = drawn_colour(row["image"])
        if question == DOCVQA_COLOUR_QUESTION:
            assert answer == colour
        else:
            assert question == DOCVQA_SHAPE_QUESTION and answer == drawn_shape(row["image"], colour)
        asked.add(question)
    assert asked == {DOCVQA_COLOUR_QUESTION, DOCVQA_SHAPE_QUESTION}


def test_cauldron_docvqa_answers_both_questions_about_its_image(docvqa, tmp_path):
    for row in load(docvqa / "the_cauldron", "docvqa", "train", tmp_path):
        (image,) = row["images"]
        colour = drawn_colour(image)
        assert [(t["user"], t["assistant"], t["source"]) for t in row["texts"]] == [
            (DOCVQA_COLOUR_QUESTION, colour, "docvqa"),
            (DOCVQA_SHAPE_QUESTION, drawn_shape(image, colour), "docvqa"),
        ]


def test_docvqa_answer_variants(tmp_path):
    write_docvqa(tmp_path / "dv", num_train=3, num_test=1, answer_variants=3)
    for row in load(tmp_path / "dv", None, "train", tmp_path / "cache"):
        answer = row["answer"]["text"]
        assert row["answers"] == [answer, answer.upper(), answer.title()]


def test_the_same_seed_writes_the_same_data(docvqa, tmp_path):
    write_docvqa(tmp_path / "again", num_train=12, num_test=4, seed=3)
    write_docvqa(tmp_path / "other", num_train=12, num_test=4, seed=4)
    assert parquet_rows(tmp_path / "again") == parquet_rows(docvqa)
    assert parquet_rows(tmp_path / "other") != parquet_rows(docvqa)


# --- the_cauldron configs -----------------------------------------------------------------------------------------


def test_hateful_memes_are_hateful_exactly_when_the_shape_is_red(tmp_path):
    write_cauldron(tmp_path / "hm", "hateful_memes", num_rows=8, seed=1)
    rows = load(tmp_path / "hm", "hateful_memes", "train", tmp_path / "cache")
    assert rows.features == CAULDRON_FEATURES
    answers = []
    for row in rows:
        (image,) = row["images"]
        (turn,) = row["texts"]
        assert (turn["user"], turn["source"]) == (HATEFUL_QUESTION, "hateful_memes")
        assert turn["assistant"] == ("yes" if drawn_colour(image) == "red" else "no")
        answers.append(turn["assistant"])
    assert answers == ["yes", "no"] * 4  # half the memes are


def test_nlvr2_statements_are_true_exactly_when_the_images_agree(tmp_path):
    write_cauldron(tmp_path / "nlvr2", "nlvr2", num_rows=8, seed=2)
    truths = []
    for row in load(tmp_path / "nlvr2", "nlvr2", "train", tmp_path / "cache"):
        left, right = row["images"]
        colours = drawn_colour(left), drawn_colour(right)
        shapes = drawn_shape(left, colours[0]), drawn_shape(right, colours[1])
        same_colour, same_shape = row["texts"]
        assert "same colour" in same_colour["user"] and "same shape" in same_shape["user"]
        assert same_colour["assistant"] == str(colours[0] == colours[1]).lower()
        assert same_shape["assistant"] == str(shapes[0] == shapes[1]).lower()
        truths.append(same_colour["assistant"])
    assert truths == ["true", "false"] * 4


def test_write_cauldron_knows_only_its_configs(tmp_path):
    with pytest.raises(KeyError):
        write_cauldron(tmp_path, "vqav2", num_rows=2)


# --- UCF-101 videos ---------------------------------------------------------------------------------------------


def test_ucf101_clips_are_decodable_videos_of_their_class(tmp_path):
    write_ucf101(tmp_path, {"train": 2, "test": 1}, seed=0)
    clips = sorted((tmp_path / "UCF101_subset").rglob("*.avi"))
    assert len(clips) == 10 * 3
    assert {p.parent.parent.name for p in clips} == {"train", "test"}
    assert (tmp_path / "UCF101_subset" / "train" / "Archery" / "v_Archery_g02_c01.avi").is_file()
    for label in (0, 9):
        name = UCF101_CLASSES[label]
        with av.open(str(tmp_path / "UCF101_subset" / "test" / name / f"v_{name}_g01_c01.avi")) as container:
            frames = [frame.to_ndarray(format="rgb24").astype(int) for frame in container.decode(video=0)]
        assert len(frames) == 24 and frames[0].shape == (72, 96, 3)
        square = np.abs(frames[0] - 110).max(-1) > 40  # what is not the grey background
        assert 0.5 * 32 * 32 < square.sum() < 1.5 * 32 * 32
        assert np.abs(frames[0][square].mean(0) - UCF101_COLOURS[label]).max() < 40  # the class colour
        first, last = (np.nonzero(np.abs(f - 110).max(-1) > 40)[1].mean() for f in (frames[0], frames[-1]))
        assert last - first > 40  # the square crosses the frame


def test_ucf101_defaults_write_train_val_and_test(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr("phi3v.data.synthetic.write_video", lambda path, colour, seed: written.append(path))
    write_ucf101(tmp_path)
    splits = [path.parent.parent.name for path in written]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (40, 10, 10)


# --- your own data ------------------------------------------------------------------------------------------------


def test_custom_data_in_both_formats_with_answerable_images(tmp_path):
    write_custom(tmp_path, num_train=10, num_eval=2, seed=5)
    records = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    llava = json.loads((tmp_path / "train.json").read_text())
    assert len(records) == len(llava) == 10 and len((tmp_path / "eval.jsonl").read_text().splitlines()) == 2
    for index, (record, other) in enumerate(zip(records, llava)):
        assert record["id"] == other["id"] == f"c{index}"
        turns = record["conversations"]
        images = [name for turn in turns for name in turn["images"]]
        assert len(images) == (0 if index % 5 == 4 else 2 if index % 4 == 3 else 1)
        if not images:
            word = turns[0]["user"].split()[-2]
            assert turns[0]["assistant"] == word[::-1] and "image" not in other and "images" not in other
            continue
        answers = [turn["assistant"] for turn in turns]
        for name, answer in zip(images, answers):
            with Image.open(tmp_path / name) as image:
                assert drawn_colour(image, tolerance=40) == answer  # a JPEG: colours within a margin
        human = [m["value"] for m in other["conversations"] if m["from"] == "human"]
        assert human[0].count("<image>") == len(images)  # the placeholders go with the first turn
        assert (other["image"] if len(images) == 1 else other["images"]) == (images[0] if len(images) == 1 else images)
        assert [m["value"] for m in other["conversations"] if m["from"] == "gpt"] == answers


# --- python -m phi3v.synthetic -----------------------------------------------------------------------------------


def test_the_cli_writes_the_asked_dataset(tmp_path, capsys):
    out = tmp_path / "hm"
    assert synthetic(["hateful_memes", "--out", str(out), "--num_train", "4", "--seed", "1"]) == 0
    assert capsys.readouterr().out == f"Wrote synthetic hateful_memes data to {out}\n"
    assert len(load(out, "hateful_memes", "train", tmp_path / "cache")) == 4
    assert synthetic(["docvqa", "--out", str(tmp_path / "dv"), "--num_train", "2", "--num_test", "1"]) == 0
    assert len(load(tmp_path / "dv", None, "test", tmp_path / "cache")) == 1


def test_every_shape_and_colour_is_drawable():
    from phi3v.data.synthetic import document_image, shape_image

    for colour in COLOURS:
        for shape in SHAPES:
            for image in (shape_image(colour, shape, "cat", seed=7), document_image(colour, shape, "dog", seed=7)):
                assert drawn_colour(image) == colour and drawn_shape(image, colour) == shape


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
