"""Conversations: what every recipe turns its rows into, and the one place prompts are built.

A ``Conversation`` is a list of turns (user text, assistant answer, the turn's images). Training
examples and evaluation prompts are both made by ``encode_conversation``, so they cannot drift:

    each turn:  <s><|user|>\\n<|image_1|>..<|image_k|>\\n{user}<|end|>\\n<|assistant|>   (processor, labels -100)
                {assistant}<|end|>\\n<|endoftext|>                                     (labels = ids)

For evaluation the last turn's answer is left out and becomes the reference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets
import torch
from PIL import Image

logger = logging.getLogger(__name__)

ANSWER_SUFFIX = "<|end|>\n<|endoftext|>"
IGNORE_INDEX = -100


@dataclass
class Turn:
    user: str
    assistant: str
    images: list[Image.Image] = field(default_factory=list)


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


def encode_conversation(processor, conversation: Conversation, for_training: bool) -> dict[str, Any]:
    """Token ids (with image placeholders), labels when training, and the turns' pixels concatenated."""
    input_ids: list[int] = []
    labels: list[int] = []
    pixel_values, image_sizes = [], []
    for position, turn in enumerate(conversation.turns):
        prompt = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_content(turn)}], tokenize=False, add_generation_prompt=True
        )
        encoded = processor(prompt, turn.images or None)
        prompt_ids = encoded["input_ids"][0].tolist()
        input_ids += prompt_ids
        labels += [IGNORE_INDEX] * len(prompt_ids)
        if turn.images:
            pixel_values.append(encoded["pixel_values"])
            image_sizes.append(encoded["image_sizes"])
        if for_training or position < len(conversation.turns) - 1:
            # no BOS before the answer: it continues the prompt
            answer_ids = processor.tokenizer(turn.assistant + ANSWER_SUFFIX, add_special_tokens=False).input_ids
            input_ids += answer_ids
            labels += answer_ids
    example = {"input_ids": torch.tensor(input_ids, dtype=torch.long)}
    if for_training:
        example["labels"] = torch.tensor(labels, dtype=torch.long)
    if pixel_values:
        example["pixel_values"] = torch.cat(pixel_values)
        example["image_sizes"] = torch.cat(image_sizes)
    return example


class ConversationDataset(torch.utils.data.Dataset):
    """Rows (a datasets.Dataset or a list) turned into encoded examples on access."""

    def __init__(self, rows: Sequence, to_conversation: Callable[[Any], Conversation], processor, for_training: bool):
        self.rows = rows
        self.to_conversation = to_conversation
        self.processor = processor
        self.for_training = for_training

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        conversation = self.to_conversation(self.rows[index])
        example = encode_conversation(self.processor, conversation, self.for_training)
        if not self.for_training:
            example.update(index=index, answers=conversation.references())
        return example


# --- loading: hub datasets and local folders ---------------------------------------------------------------


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
    """``datasets.load_dataset`` on a hub id or a local mirror of its repository, with a schema check."""
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
    _check_text_columns(rows, [c for c in required if c in TEXT_CHECKS], f"{flag} {name_or_path!r} ({split})")
    return rows


def _texts_problem(texts: Any) -> str | None:
    if not isinstance(texts, list) or not texts:
        return "texts must be a non-empty list"
    if not all(isinstance(t, dict) and isinstance(t.get("user"), str) for t in texts):
        return "every texts item needs string 'user' and 'assistant'"
    if not all(isinstance(t.get("assistant"), str) for t in texts):
        return "every texts item needs string 'user' and 'assistant'"
    return None


def _answers_problem(answers: Any) -> str | None:
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return "answers must be a non-empty list of strings"
    return None


def _query_problem(query: Any) -> str | None:
    return None if isinstance(query, dict) and isinstance(query.get("en"), str) else "query needs a string 'en'"


# Text columns whose content is checked for every row before training (images are decoded lazily).
TEXT_CHECKS = {"texts": _texts_problem, "answers": _answers_problem, "query": _query_problem}


def _check_text_columns(rows, columns: list[str], where: str) -> None:
    problems = []
    for column in columns:
        for index, value in enumerate(rows[column]):
            if (problem := TEXT_CHECKS[column](value)) is not None:
                problems.append(f"row {index}: {problem}")
    if problems:
        shown = "\n  ".join(problems[:10])
        raise ValueError(f"{len(problems)} bad row(s) in {where}:\n  {shown}")


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


def load_cauldron_splits(name_or_path: str, config: str, eval_size: int, images_per_row: int | None = None):
    """the_cauldron has only a train split: rows [eval_size:] train, rows [:eval_size] evaluate (spec §1.3)."""
    rows = load_hub_dataset(name_or_path, config, "train", "--dataset_name_or_path", ["images", "texts"])
    if len(rows) <= eval_size:
        raise ValueError(
            f"--dataset_name_or_path {name_or_path!r} ({config}) has {len(rows)} rows, not more than --eval_size "
            f"{eval_size}: nothing would be left to train on. Lower --eval_size."
        )
    if images_per_row is not None:
        # Count images without decoding them, so a bad row is reported before training.
        counts = rows.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))["images"]
        bad = [i for i, images in enumerate(counts) if len(images) != images_per_row]
        if bad:
            raise ValueError(f"{config} rows {bad[:10]} do not hold exactly {images_per_row} images ({len(bad)} rows).")
    return rows.select(range(eval_size, len(rows))), rows.select(range(eval_size))


def load_jsonl_conversations(jsonl_file: str | Path, image_dir: str | Path) -> list[dict]:
    """Read and check every line of a conversations jsonl file (the UCF-101 / custom format) up front.

    Each line: {"id": str, "source": str, "conversations": [{"images": [path, ...], "user": str,
    "assistant": str}, ...]} with image paths relative to ``image_dir``. Problems are reported with
    file and line before anything trains; image paths may not leave ``image_dir``. The returned
    records hold absolute image paths.
    """
    jsonl_file, image_dir = Path(jsonl_file), Path(image_dir).resolve()
    if not jsonl_file.is_file():
        raise FileNotFoundError(f"{jsonl_file}: no such file.")
    records, problems = [], []
    for line_number, line in enumerate(jsonl_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{jsonl_file}:{line_number}"
        try:
            record = json.loads(line)
            problems += [f"{where}: {p}" for p in _record_problems(record, image_dir)]
            records.append(_with_absolute_paths(record, image_dir))
        except json.JSONDecodeError as error:
            problems.append(f"{where}: not valid JSON ({error.msg} at column {error.colno})")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{len(problems)} problem(s) in {jsonl_file}:\n  {shown}{more}")
    if not records:
        raise ValueError(f"{jsonl_file} holds no samples.")
    return records


def _record_problems(record: Any, image_dir: Path) -> list[str]:
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
            continue
        for path in images:
            resolved = (image_dir / path).resolve()
            if not resolved.is_relative_to(image_dir):
                problems.append(f"turn {number}: image path {path!r} leaves the image folder {image_dir}")
            elif not resolved.is_file():
                problems.append(f"turn {number}: image {resolved} does not exist")
    return problems


def _with_absolute_paths(record: Any, image_dir: Path) -> Any:
    try:
        turns = [
            {**turn, "images": [str(image_dir / p) for p in turn.get("images", [])]} for turn in record["conversations"]
        ]
        return {**record, "conversations": turns}
    except (TypeError, KeyError, AttributeError):
        return record  # malformed: already reported by _record_problems


def jsonl_conversation(record: dict) -> Conversation:
    """A record from ``load_jsonl_conversations`` as a Conversation, its images opened."""
    turns = [
        Turn(turn["user"], turn["assistant"], [_open_rgb(Path(p)) for p in turn.get("images", [])])
        for turn in record["conversations"]
    ]
    return Conversation(turns)


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
