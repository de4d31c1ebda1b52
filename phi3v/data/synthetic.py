"""Synthetic datasets in the exact hub schemas, so every recipe runs offline on the same code path
(``python -m phi3v.synthetic`` writes them).

Each folder mirrors its hub repository (parquet shards plus a README.md whose YAML names the configs and
splits), so ``datasets.load_dataset(DIR[, config])`` reads it like the hub id. Every question is
answerable from the image alone (colours and shapes drawn large), so a finetune measurably learns it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path

import av
import numpy as np
from datasets import Dataset, Features, Sequence, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 170),
    "orange": (250, 135, 20),
}
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "dog", "sun", "moon", "tree", "car", "house", "boat", "fish", "bird")
# The ten classes of the UCF-101 subset the original recipe downloads.
UCF101_CLASSES = (
    "ApplyEyeMakeup", "ApplyLipstick", "Archery", "BabyCrawling", "BalanceBeam",
    "BandMarching", "BaseballPitch", "Basketball", "BasketballDunk", "BenchPress",
)  # fmt: skip
UCF101_COLOURS = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (128, 128, 0), (0, 0, 128),
]  # fmt: skip

DOCVQA_COLOUR_QUESTION = "What colour is the shape?"
DOCVQA_SHAPE_QUESTION = "What shape is drawn?"
HATEFUL_QUESTION = "Is this meme hateful? Answer yes or no."


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=fill)


def shape_image(colour: str, shape: str, word: str, size=(160, 120), seed: int = 0) -> Image.Image:
    """A light background with a large coloured shape and a caption word."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randint(225, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    width, height = size
    extent = rng.randint(int(0.45 * height), int(0.6 * height))
    left, top = rng.randint(5, width - extent - 5), rng.randint(5, height - extent - 25)
    draw_shape(draw, shape, (left, top, left + extent, top + extent), COLOURS[colour])
    draw.text((6, height - 22), word, fill=(20, 20, 20), font=_font(18))
    return image


def document_image(colour: str, shape: str, word: str, seed: int) -> Image.Image:
    """A portrait 'document': a title word, grey text lines and a large coloured shape."""
    rng = random.Random(seed)
    image = Image.new("RGB", (180, 240), "white")
    draw = ImageDraw.Draw(image)
    draw.text((12, 8), word.upper(), fill="black", font=_font(28))
    for y in range(50, 230, 12):
        draw.line((12, y, rng.randint(90, 168), y), fill=(170, 170, 170), width=2)
    extent = rng.randint(100, 130)
    left, top = rng.randint(8, 172 - extent), rng.randint(50, 232 - extent)
    draw_shape(draw, shape, (left, top, left + extent, top + extent), COLOURS[colour])
    return image


# --- hub layouts -------------------------------------------------------------------------------------------


def _write_readme(out: Path, configs: dict[str, list[str]]) -> None:
    """README.md with the YAML `configs:` block datasets reads to find configs and splits."""
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        folder = "data" if config == "default" else config
        lines += [f"- config_name: {config}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {folder}/{split}-*" for split in splits]
    lines += ["---", "", "Synthetic data written by `python -m phi3v.synthetic` (phi3v)."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def _write_split(rows: list[dict], features: Features, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows, features=features).to_parquet(str(path))


CAULDRON_FEATURES = Features(
    {
        "images": Sequence(ImageFeature()),
        "texts": [{"user": Value("string"), "assistant": Value("string"), "source": Value("string")}],
    }
)
DOCVQA_MINI_FEATURES = Features(
    {
        "id": Value("string"),
        "image": ImageFeature(),
        "query": {lang: Value("string") for lang in ("de", "en", "es", "fr", "it")},
        "answers": Sequence(Value("string")),
        "words": Sequence(Value("string")),
        "bounding_boxes": Sequence(Sequence(Value("float32"), length=4)),
        "answer": {"match_score": Value("float64"), "matched_text": Value("string"), "start": Value("int64"),
                   "text": Value("string")},
    }
)  # fmt: skip


def _docvqa_question(rng: random.Random) -> tuple[str, str, str, str]:
    colour, shape, word = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(WORDS)
    return colour, shape, word, rng.choice([DOCVQA_COLOUR_QUESTION, DOCVQA_SHAPE_QUESTION])


# Spellings of one answer, as DocVQA lists several acceptable answers for many questions.
ANSWER_VARIANTS = (str, str.upper, str.title)


def docvqa_mini_row(index: int, rng: random.Random, answer_variants: int = 1) -> dict:
    colour, shape, word, question = _docvqa_question(rng)
    answer = colour if question == DOCVQA_COLOUR_QUESTION else shape
    return {
        "id": f"synthetic_{index}",
        "image": document_image(colour, shape, word, seed=index),
        "query": {lang: question for lang in ("de", "en", "es", "fr", "it")},
        "answers": [spell(answer) for spell in ANSWER_VARIANTS[:answer_variants]],
        "words": [word.upper()],
        "bounding_boxes": [[12.0, 8.0, 100.0, 36.0]],
        "answer": {"match_score": 1.0, "matched_text": answer, "start": 0, "text": answer},
    }


def docvqa_cauldron_row(index: int, rng: random.Random) -> dict:
    colour, shape, word, _ = _docvqa_question(rng)
    texts = [
        {"user": DOCVQA_COLOUR_QUESTION, "assistant": colour, "source": "docvqa"},
        {"user": DOCVQA_SHAPE_QUESTION, "assistant": shape, "source": "docvqa"},
    ]
    return {"images": [document_image(colour, shape, word, seed=index)], "texts": texts}


def hateful_memes_row(index: int, rng: random.Random) -> dict:
    """'Hateful' exactly when the shape is red: half the memes are."""
    hateful = index % 2 == 0
    colour = "red" if hateful else rng.choice([c for c in COLOURS if c != "red"])
    image = shape_image(colour, rng.choice(SHAPES), rng.choice(WORDS), seed=index)
    answer = "yes" if hateful else "no"
    return {"images": [image], "texts": [{"user": HATEFUL_QUESTION, "assistant": answer, "source": "hateful_memes"}]}


def nlvr2_row(index: int, rng: random.Random) -> dict:
    """Two images; turn 1 asks whether the colours match, turn 2 whether the shapes match."""
    colours = rng.sample(list(COLOURS), 2)
    shapes = rng.sample(SHAPES, 2)
    same_colour, same_shape = index % 2 == 0, rng.random() < 0.5
    left = (colours[0], shapes[0])
    right = (colours[0] if same_colour else colours[1], shapes[0] if same_shape else shapes[1])
    images = [shape_image(c, s, rng.choice(WORDS), seed=2 * index + k) for k, (c, s) in enumerate([left, right])]
    texts = [
        {"user": "The two images show shapes of the same colour. Answer true or false.",
         "assistant": "true" if same_colour else "false", "source": "nlvr2"},
        {"user": "The two images show the same shape. Answer true or false.",
         "assistant": "true" if same_shape else "false", "source": "nlvr2"},
    ]  # fmt: skip
    return {"images": images, "texts": texts}


def _rows(make_row: Callable[[int, random.Random], dict], count: int, start: int, seed: int, desc: str) -> list[dict]:
    rng = random.Random(seed)
    return [make_row(start + i, rng) for i in tqdm(range(count), desc=desc, leave=False)]


def write_docvqa(out: Path, num_train: int = 200, num_test: int = 40, seed: int = 0, answer_variants: int = 1) -> None:
    """nielsr/docvqa_1200_examples layout at `out`, and the_cauldron's docvqa config at `out/the_cauldron`.
    ``answer_variants`` (1 to 3) reference answers per question: the answer, upper-case, title-case."""
    make_row = partial(docvqa_mini_row, answer_variants=answer_variants)
    _write_split(
        _rows(make_row, num_train, 0, seed, "docvqa train"),
        DOCVQA_MINI_FEATURES,
        out / "data" / "train-00000-of-00001.parquet",
    )
    _write_split(
        _rows(make_row, num_test, num_train, seed + 1, "docvqa test"),
        DOCVQA_MINI_FEATURES,
        out / "data" / "test-00000-of-00001.parquet",
    )
    _write_readme(out, {"default": ["train", "test"]})
    cauldron = out / "the_cauldron"
    _write_split(
        _rows(docvqa_cauldron_row, num_train, 0, seed + 2, "cauldron docvqa"),
        CAULDRON_FEATURES,
        cauldron / "docvqa" / "train-00000-of-00001.parquet",
    )
    _write_readme(cauldron, {"docvqa": ["train"]})


def write_cauldron(out: Path, config: str, num_rows: int, seed: int = 0) -> None:
    """One the_cauldron config (train split only, as on the hub)."""
    make_row = {"hateful_memes": hateful_memes_row, "nlvr2": nlvr2_row}[config]
    _write_split(
        _rows(make_row, num_rows, 0, seed, config), CAULDRON_FEATURES, out / config / "train-00000-of-00001.parquet"
    )
    _write_readme(out, {config: ["train"]})


def write_video(path: Path, colour: tuple[int, int, int], seed: int, frames: int = 24, size=(96, 72)) -> None:
    """A small MPEG-4 AVI clip: a coloured square crossing a grey background."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        y = rng.randint(4, height - 36)
        for t in range(frames):
            frame = np.full((height, width, 3), 110, dtype=np.uint8)
            x = int((width - 32) * t / (frames - 1))
            frame[y : y + 32, x : x + 32] = colour
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_ucf101(out: Path, clips_per_split: dict[str, int] | None = None, seed: int = 0) -> None:
    """UCF101_subset/{train,val,test}/<Class>/v_<Class>_gXX_cYY.avi, one colour per class."""
    clips_per_split = clips_per_split or {"train": 4, "val": 1, "test": 1}
    jobs = [
        (split, label, clip)
        for split, count in clips_per_split.items()
        for label in range(len(UCF101_CLASSES))
        for clip in range(count)
    ]
    for n, (split, label, clip) in enumerate(tqdm(jobs, desc="ucf101 videos", leave=False)):
        name = UCF101_CLASSES[label]
        path = out / "UCF101_subset" / split / name / f"v_{name}_g{clip + 1:02d}_c01.avi"
        write_video(path, UCF101_COLOURS[label], seed=seed * 100_000 + n)


# --- your own data: the cookbook's conversation jsonl and LLaVA-style JSON ------------------------------------


def custom_record(index: int, rng: random.Random, folder: Path) -> dict:
    """A cookbook-format record: most ask about one image; every fourth compares two images over two turns;
    every fifth is text only."""
    if index % 5 == 4:
        word = rng.choice(WORDS)
        return {"id": f"c{index}", "source": "synthetic", "conversations": [
            {"images": [], "user": f"Spell the word {word} backwards.", "assistant": word[::-1]}]}  # fmt: skip
    colours = rng.sample(list(COLOURS), 2)
    shapes = [rng.choice(SHAPES), rng.choice(SHAPES)]
    names = []
    for k in range(2 if index % 4 == 3 else 1):
        names.append(f"images/{index}_{k}.jpg")  # relative to the data files' folder
        shape_image(colours[k], shapes[k], rng.choice(WORDS), seed=1000 + 2 * index + k).save(folder / names[-1])
    if len(names) == 1:
        turn = {"images": names, "user": DOCVQA_COLOUR_QUESTION, "assistant": colours[0]}
        return {"id": f"c{index}", "source": "synthetic", "conversations": [turn]}
    turns = [
        {"images": names, "user": "What colour is the shape in the first image?", "assistant": colours[0]},
        {"images": [], "user": "And in the second image?", "assistant": colours[1]},
    ]
    return {"id": f"c{index}", "source": "synthetic", "conversations": turns}


def as_llava(record: dict) -> dict:
    """The same sample in LLaVA's layout: <image> placeholders in the human messages, images listed once."""
    images, messages = [], []
    for turn in record["conversations"]:
        images += turn["images"]
        placeholders = "<image>\n" * len(turn["images"])
        messages += [
            {"from": "human", "value": placeholders + turn["user"]},
            {"from": "gpt", "value": turn["assistant"]},
        ]
    key = {"image": images[0]} if len(images) == 1 else {"images": images}
    return {"id": record["id"], **(key if images else {}), "conversations": messages}


def write_custom(out: Path, num_train: int = 40, num_eval: int = 10, seed: int = 0) -> None:
    """DIR/{train,eval}.jsonl (the cookbook's format) and DIR/{train,eval}.json (LLaVA), the same samples;
    images in DIR/images, their paths relative to DIR."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits = {"train": range(num_train), "eval": range(num_train, num_train + num_eval)}
    for split, indices in splits.items():
        records = [custom_record(i, rng, out) for i in indices]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / f"{split}.json").write_text(json.dumps([as_llava(r) for r in records], indent=1) + "\n")
