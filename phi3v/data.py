"""Conversations, the one place prompts are built, the training/evaluation datasets, and data loading.

A ``Conversation`` is a list of turns (user text, assistant answer, the turn's images). Training
examples and evaluation prompts are both made by ``conversation_ids``, so they cannot drift:

    each turn:  <s><|user|>\\n<|image_1|>..<|image_k|>\\n{user}<|end|>\\n<|assistant|>   (processor, labels -100)
                {assistant}<|end|>\\n<|endoftext|>                                     (labels = ids)

For evaluation the last turn's answer is left out and becomes the reference.

Rows come from a ``RowSource``: a hub split (or local mirror) read with undecoded images, or the lines
of a conversation jsonl file. Rows are checked and their images decoded once before training by
``phi3v.validate``; here they are only read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets
import torch

from .images import ImageRef, load_image

logger = logging.getLogger(__name__)

ANSWER_SUFFIX = "<|end|>\n<|endoftext|>"
IGNORE_INDEX = -100


@dataclass
class Turn:
    user: str
    assistant: str
    images: list[ImageRef] = field(default_factory=list)


@dataclass
class Conversation:
    turns: list[Turn]
    answers: list[str] | None = None  # references for evaluation; default: the last turn's answer

    def references(self) -> list[str]:
        return self.answers if self.answers is not None else [self.turns[-1].assistant]


def user_content(turn: Turn) -> str:
    """Image tags numbered from 1 in every turn, a newline, then the text (spec §1.4)."""
    if not turn.images:
        return turn.user
    tags = "".join(f"<|image_{k}|>" for k in range(1, len(turn.images) + 1))
    return f"{tags}\n{turn.user}"


def conversation_ids(
    processor, conversation: Conversation, image_tokens: Sequence[Sequence[int]], for_training: bool
) -> tuple[list[int], list[int]]:
    """input_ids and labels of a conversation whose turn t has images of ``image_tokens[t]`` placeholders."""
    input_ids: list[int] = []
    labels: list[int] = []
    for position, (turn, counts) in enumerate(zip(conversation.turns, image_tokens, strict=True)):
        prompt = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_content(turn)}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = processor.prompt_ids(prompt, counts)
        input_ids += prompt_ids
        labels += [IGNORE_INDEX] * len(prompt_ids)
        if for_training or position < len(conversation.turns) - 1:
            # no BOS before the answer: it continues the prompt
            answer_ids = processor.tokenizer(turn.assistant + ANSWER_SUFFIX, add_special_tokens=False).input_ids
            input_ids += answer_ids
            labels += answer_ids
    return input_ids, labels


def encode_conversation(processor, conversation: Conversation, for_training: bool) -> dict[str, Any]:
    """Token ids (with image placeholders), labels when training, and the turns' pixels concatenated."""
    pixel_values, image_sizes, image_tokens = [], [], []
    for turn in conversation.turns:
        counts = []
        if turn.images:
            processed = processor.image_processor([load_image(ref) for ref in turn.images])
            pixel_values.append(processed["pixel_values"])
            image_sizes.append(processed["image_sizes"])
            counts = processed["num_img_tokens"]
        image_tokens.append(counts)
    input_ids, labels = conversation_ids(processor, conversation, image_tokens, for_training)
    example = {"input_ids": torch.tensor(input_ids, dtype=torch.long)}
    if for_training:
        example["labels"] = torch.tensor(labels, dtype=torch.long)
    if pixel_values:
        example["pixel_values"] = torch.cat(pixel_values)
        example["image_sizes"] = torch.cat(image_sizes)
    return example


def as_candidates(built: Conversation | list[Conversation]) -> list[Conversation]:
    """What a row becomes for training: one Conversation, or a list of them to draw from."""
    return built if isinstance(built, list) else [built]


def sample_rng(seed: int, epoch: int, row: int) -> random.Random:
    """The random choices made for one row in one epoch (DocVQA's answer, --full_train's question).

    Drawn from (seed, epoch, row) alone rather than from a dataloader worker's random state, so a resumed
    run, a different worker count or another rank makes exactly the same choices."""
    return random.Random(f"{seed}:{epoch}:{row}")


class TrainingSamples(torch.utils.data.Dataset):
    """The kept rows of a source as training examples. ``conversation(row)`` gives what a row becomes, or a
    list of conversations of which one is drawn (with ``sample_rng``) each time the row is seen."""

    def __init__(self, source: RowSource, rows: Sequence[int], conversation: Callable, processor, seed: int):
        self.source, self.rows, self.conversation = source, list(rows), conversation
        self.processor, self.seed, self.epoch = processor, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        candidates = as_candidates(self.conversation(self.source.rows[row]))
        conversation = sample_rng(self.seed, self.epoch, row).choice(candidates)
        return {**encode_conversation(self.processor, conversation, for_training=True), "row": row}


class EvaluationSamples(torch.utils.data.Dataset):
    """The kept rows of a source as evaluation prompts, with their position and reference answers."""

    def __init__(self, source: RowSource, rows: Sequence[int], conversation: Callable, processor):
        self.source, self.rows, self.conversation, self.processor = source, list(rows), conversation, processor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        conversation = self.conversation(self.source.rows[self.rows[index]])
        example = encode_conversation(self.processor, conversation, for_training=False)
        return {**example, "index": index, "answers": conversation.references()}


# --- row sources: hub datasets and jsonl files ---------------------------------------------------------------


@dataclass
class RowSource:
    """The rows one split reads, how to name each for the user, and its per-row schema check."""

    rows: Sequence  # indexed as the user would: dataset[i] of the hub split, or one item per jsonl line
    indices: list[int]  # the rows this split uses, in order
    origin: str  # e.g. "--dataset_name_or_path 'x' (config nlvr2, split train)"
    fingerprint: str  # changes whenever the data does (the validation cache key)
    schema_problems: Callable[[Any], list[str]]
    locations: Sequence[str] | None = None  # jsonl: "file:line" per row

    def where(self, row: int) -> str:
        return self.locations[row] if self.locations is not None else f"{self.origin} row {row}"

    def select(self, indices: Sequence[int]) -> RowSource:
        """The same rows, this split using only ``indices``."""
        return replace(self, indices=list(indices))


def require_local_or_reachable(name_or_path: str, flag: str, offline_hint: str) -> None:
    """Fail in seconds, with the offline alternative, when a hub id cannot be fetched."""
    if Path(name_or_path).exists():
        return
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname
        try:
            socket.create_connection((host, 443), timeout=3).close()
            return
        except OSError as error:
            reason = f"the hub ({host}) cannot be reached: {error}"
    raise RuntimeError(
        f"{flag} {name_or_path!r} is not a local folder and {reason}. To run offline, point {flag} at a local "
        f"folder instead: {offline_hint}"
    )


def load_hub_dataset(name_or_path: str, config: str | None, split: str, flag: str, required: Sequence[str]):
    """``datasets.load_dataset`` on a hub id or a local mirror of its repository, with a column check."""
    require_local_or_reachable(
        name_or_path, flag, "`python -m phi3v.synthetic <task> --out DIR` writes one in the hub's layout."
    )
    cache_dir = _local_cache_dir(Path(name_or_path)) if Path(name_or_path).is_dir() else None
    rows = datasets.load_dataset(name_or_path, config, split=split, cache_dir=cache_dir)
    missing = [column for column in required if column not in rows.column_names]
    if missing:
        raise ValueError(
            f"{flag} {name_or_path!r} (config {config}, split {split}) lacks the column(s) {missing}; it has "
            f"{rows.column_names}. Expected the schema of the hub dataset this recipe reads (see README)."
        )
    return rows


class UndecodedRows(Sequence):
    """A hub split's rows as plain Python with images left as ``{"bytes", "path"}``: they are decoded where
    they are used, by ``phi3v.images`` (read through Arrow, so no copy of the dataset is written)."""

    def __init__(self, dataset: datasets.Dataset):
        self.table = dataset.with_format("arrow")

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.table[index].to_pylist()[0]


def load_hub_source(
    name_or_path: str, config: str | None, split: str, flag: str, required: Sequence[str], **checks
) -> RowSource:
    """A hub split (or local mirror) as a RowSource over all its rows."""
    rows = load_hub_dataset(name_or_path, config, split, flag, required)
    return hub_source(rows, name_or_path, config, split, flag, **checks)


def hub_source(rows, name_or_path: str, config: str | None, split: str, flag: str, **checks) -> RowSource:
    """All rows of a loaded hub split; ``checks`` go to ``schema_problems`` (e.g. ``images_per_row=2``)."""
    origin = f"{flag} {name_or_path!r} ({f'config {config}, ' if config else ''}split {split})"
    problems = partial(_hub_row_problems, columns=tuple(rows.column_names), **checks)
    return RowSource(UndecodedRows(rows), list(range(len(rows))), origin, rows._fingerprint, problems)


def _hub_row_problems(row: dict, columns: tuple[str, ...], images_per_row: int | None = None) -> list[str]:
    problems = [p for column in columns if column in TEXT_CHECKS and (p := TEXT_CHECKS[column](row[column]))]
    if "images" in columns:
        images = row["images"]
        if not isinstance(images, list) or not images:
            problems.append("images must be a non-empty list of images")
        elif images_per_row is not None and len(images) != images_per_row:
            problems.append(f"holds {len(images)} image(s), this recipe needs exactly {images_per_row}")
    if "image" in columns and row["image"] is None:
        problems.append("image is missing")
    return problems


def _texts_problem(texts: Any) -> str | None:
    if not isinstance(texts, list) or not texts:
        return "texts must be a non-empty list"
    for number, item in enumerate(texts, start=1):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("user", "assistant")):
            return f"texts item {number} needs string 'user' and 'assistant'"
    return None


def _answers_problem(answers: Any) -> str | None:
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return "answers must be a non-empty list of strings"
    return None


def _query_problem(query: Any) -> str | None:
    return None if isinstance(query, dict) and isinstance(query.get("en"), str) else "query needs a string 'en'"


# Text columns whose content every row must have (the conversation builders rely on them).
TEXT_CHECKS = {"texts": _texts_problem, "answers": _answers_problem, "query": _query_problem}


def _local_cache_dir(folder: Path) -> str:
    """A datasets cache folder of its own for a local dataset folder and its current files.

    datasets keys the cache of a local folder by its name and relative file patterns only, so two
    folders called ``docvqa`` (or one folder whose files were rewritten) would silently share stale rows.
    """
    folder = folder.resolve()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    stamp = [str(folder)] + [f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "phi3v-local" / f"{folder.name}-{digest}")


def load_cauldron_splits(
    name_or_path: str, config: str, eval_size: int, images_per_row: int | None = None
) -> tuple[RowSource, RowSource]:
    """the_cauldron has only a train split: rows [eval_size:] train, rows [:eval_size] evaluate (spec §1.3).
    Both sources number rows as the hub's train split does."""
    flag = "--dataset_name_or_path"
    rows = load_hub_dataset(name_or_path, config, "train", flag, ["images", "texts"])
    if len(rows) <= eval_size:
        raise ValueError(
            f"{flag} {name_or_path!r} ({config}) has {len(rows)} rows, not more than --eval_size "
            f"{eval_size}: nothing would be left to train on. Lower --eval_size."
        )
    source = hub_source(rows, name_or_path, config, "train", flag, images_per_row=images_per_row)
    return source.select(range(eval_size, len(rows))), source.select(range(eval_size))


@dataclass
class JsonlLine:
    """One line of a conversation jsonl file: its record (image paths made absolute) or what is wrong."""

    record: dict | None
    problems: list[str]


def read_jsonl(jsonl_file: str | Path, image_dir: str | Path) -> RowSource:
    """Every non-empty line of a conversations jsonl file (the UCF-101 / custom format), checked.

    Each line: {"id": str, "source": str, "conversations": [{"images": [path, ...], "user": str,
    "assistant": str}, ...]} with image paths relative to ``image_dir``. A path that leaves ``image_dir``
    (``..``, an absolute path, a symlink pointing outside) is a problem of its line and never opened."""
    jsonl_file, image_dir = Path(jsonl_file), Path(image_dir).resolve()
    if not jsonl_file.is_file():
        raise FileNotFoundError(f"{jsonl_file}: no such file.")
    text = jsonl_file.read_text()
    lines, locations, stamps = [], [], [hashlib.sha256(text.encode()).hexdigest()]
    for line_number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            lines.append(_read_line(line, image_dir, stamps))
            locations.append(f"{jsonl_file}:{line_number}")
    if not lines:
        raise ValueError(f"{jsonl_file} holds no samples.")
    fingerprint = hashlib.sha256("\n".join(stamps).encode()).hexdigest()
    return RowSource(lines, list(range(len(lines))), str(jsonl_file), fingerprint, _jsonl_line_problems, locations)


def _jsonl_line_problems(line: JsonlLine) -> list[str]:
    return line.problems


def _read_line(line: str, image_dir: Path, stamps: list[str]) -> JsonlLine:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return JsonlLine(None, [f"not valid JSON ({error.msg} at column {error.colno})"])
    problems = _record_problems(record)
    if problems:
        return JsonlLine(None, problems)
    turns = []
    for number, turn in enumerate(record["conversations"], start=1):
        paths = []
        for path in turn.get("images", []):
            resolved = (image_dir / path).resolve()
            if not resolved.is_relative_to(image_dir):
                problems.append(f"turn {number}: image path {path!r} leaves the image folder {image_dir}")
            elif not resolved.is_file():
                problems.append(f"turn {number}: image {resolved} does not exist")
            else:
                stat = resolved.stat()
                stamps.append(f"{resolved}:{stat.st_size}:{stat.st_mtime_ns}")
            paths.append(str(resolved))
        turns.append({**turn, "images": paths})
    return JsonlLine(None if problems else {**record, "conversations": turns}, problems)


def _record_problems(record: Any) -> list[str]:
    if not isinstance(record, dict):
        return ["a line must be a JSON object"]
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return ['"conversations" must be a non-empty list of turns']
    problems = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            problems.append(f"turn {number} must be an object")
            continue
        for key in ("user", "assistant"):
            if not isinstance(turn.get(key), str):
                problems.append(f'turn {number}: "{key}" must be a string')
        images = turn.get("images", [])
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            problems.append(f'turn {number}: "images" must be a list of paths')
    return problems


def jsonl_conversation(line: JsonlLine) -> Conversation:
    """A checked jsonl line as a Conversation (images as paths, opened when encoded)."""
    return Conversation([Turn(t["user"], t["assistant"], t["images"]) for t in line.record["conversations"]])
