"""Where a recipe's rows come from: hub datasets (or local mirrors of them) and conversation files.

A ``RowSource`` is the rows one split reads, in the numbering the user knows (``dataset[i]`` of the hub
split, or the records of a file with their line), and the check each row must pass before it becomes a
``Conversation``. Images stay undecoded here (hub rows keep ``{"bytes", "path"}``, files keep their
checked paths): they are decoded where they are used, by ``phi3v.images``.

Conversation files come in two formats, told apart by their first character:
- the cookbook's jsonl (UCF-101 and any custom data): one object per line,
  ``{"id", "source", "conversations": [{"images": [path, ...], "user": str, "assistant": str}, ...]}``;
- LLaVA-style JSON, a list of ``{"id", "image": path or "images": [paths], "conversations":
  [{"from": "human", "value": "<image>\n..."}, {"from": "gpt", "value": "..."}, ...]}``.
Image paths are relative to an image folder and may not leave it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets

from .data import Conversation, Turn

logger = logging.getLogger(__name__)


@dataclass
class RowSource:
    """The rows one split reads, how to name each for the user, and its per-row schema check."""

    rows: Sequence  # indexed as the user would: dataset[i] of the hub split, or one item per jsonl line
    indices: list[int]  # the rows this split uses, in order
    origin: str  # e.g. "--dataset_name_or_path 'x' (config nlvr2, split train)"
    fingerprint: str  # changes whenever any data file is touched (the validation cache key)
    schema_problems: Callable[[Any], list[str]]
    locations: Sequence[str] | None = None  # jsonl: "file:line" per row
    # What the data is, wherever it lies and whenever its files were written (names relative to the data
    # folder and sizes, a conversation file's bytes): what a checkpoint records of its training data.
    identity: str = ""

    def where(self, row: int) -> str:
        return self.locations[row] if self.locations is not None else f"{self.origin} row {row}"

    @classmethod
    def of(cls, items: Sequence, origin: str) -> RowSource:
        """Items already checked (e.g. prompts built in code), numbered from 0."""
        return cls(items, list(range(len(items))), origin, "", _no_problems)

    def select(self, indices: Sequence[int]) -> RowSource:
        """The same rows, this split using only ``indices``."""
        return replace(self, indices=list(indices))


def _no_problems(row: Any) -> list[str]:
    return []


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
    """All rows of a loaded hub split; ``checks`` go to ``schema_problems`` (e.g. ``images_per_row=2``).

    Its fingerprint and identity: datasets' fingerprint for a hub id (it changes with the repository's
    revision); for a local folder, those of its files (``folder_stamps``), since datasets' own names the
    folder, not what it holds."""
    origin = f"{flag} {name_or_path!r} ({f'config {config}, ' if config else ''}split {split})"
    problems = partial(_hub_row_problems, columns=tuple(rows.column_names), **checks)
    fingerprint = identity = rows._fingerprint
    if Path(name_or_path).is_dir():
        fingerprint, identity = (_digest(stamp, str(config), split) for stamp in folder_stamps(Path(name_or_path)))
    return RowSource(UndecodedRows(rows), list(range(len(rows))), origin, fingerprint, problems, identity=identity)


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


def file_stamps(path: Path, name: str, identity_name: str | None = None) -> tuple[str, str]:
    """A file as a fingerprint sees it (``name``, size, modification time in ns) and as an identity does
    (``identity_name``, default ``name``, and size), from one stat."""
    stat = path.stat()
    return f"{name}:{stat.st_size}:{stat.st_mtime_ns}", f"{identity_name or name}:{stat.st_size}"


def data_files(folder: Path) -> list[tuple[str, Path]]:
    """(path relative to ``folder``, path) of every file under it, but hidden ones (a part of the path
    starting with "." or "__": .git, .cache/huggingface), which datasets does not read either."""
    folder = folder.resolve()
    relative = ((p.relative_to(folder), p) for p in folder.rglob("*") if p.is_file())
    return sorted((r.as_posix(), p) for r, p in relative if not any(part.startswith((".", "__")) for part in r.parts))


def folder_stamps(folder: Path) -> tuple[str, str]:
    """(fingerprint, identity) of the data files under ``folder``. The fingerprint, the hash of every file's
    relative path, size and modification time in nanoseconds, changes when any is added, removed, resized
    or modified (contents are not read, so a mirror of hundreds of GB is checked in a moment; a tool that
    rewrites a file keeping its size and time is not seen). The identity, paths and sizes only, is the same
    for a copy of the folder, made elsewhere or later."""
    stamps = [file_stamps(path, name) for name, path in data_files(folder)]
    return _digest(*(stamp for stamp, _ in stamps)), _digest(*(identity for _, identity in stamps))


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _local_cache_dir(folder: Path) -> str:
    """A datasets cache folder of its own for a local dataset folder and its current files.

    datasets keys the cache of a local folder by its name and relative file patterns only, so two
    folders called ``docvqa`` (or one folder whose files were rewritten) would silently share stale rows.
    """
    folder = folder.resolve()
    digest = _digest(str(folder), folder_stamps(folder)[0])[:16]
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


def read_conversations(file: str | Path, image_dir: str | Path) -> RowSource:
    """Every record of a conversation file, in either format (a file starting with "[" is LLaVA JSON),
    checked: image paths that leave ``image_dir`` (``..``, absolute paths, symlinks pointing outside) or do
    not exist are a problem of their record, never opened. Records become the cookbook's format. The file
    is UTF-8 (a byte-order mark is fine); a line that is not is a problem of its record."""
    file, image_dir = Path(file), Path(image_dir).resolve()
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file.")
    data = file.read_bytes()
    is_llava = data.removeprefix(UTF8_BOM).lstrip().startswith(b"[")
    parsed = _llava_records(file, data) if is_llava else _jsonl_records(file, data)
    if not parsed:
        raise ValueError(f"{file} holds no samples.")
    content = hashlib.sha256(data).hexdigest()
    stamps, identities = [content], [content]
    lines = [_checked_line(record, image_dir, stamps, identities) for _, record in parsed]
    locations = [location for location, _ in parsed]
    fingerprint, identity = _digest(*stamps), _digest(*identities)
    return RowSource(lines, list(range(len(lines))), str(file), fingerprint, _jsonl_line_problems, locations, identity)


UTF8_BOM = b"\xef\xbb\xbf"
NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what undecodable bytes become with errors="surrogateescape"


def text_lines(data: bytes) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, the line decoded as UTF-8 or None, or why it is not UTF-8) for each line of ``data``."""
    for number, raw in enumerate(data.removeprefix(UTF8_BOM).split(b"\n"), start=1):
        try:
            yield number, raw.decode("utf-8"), None
        except UnicodeDecodeError as error:
            yield number, None, _not_utf8(raw[error.start], error.start + 1)


def _not_utf8(byte: int, position: int) -> str:
    return f"not UTF-8 text (byte 0x{byte:02x} at byte {position} of the line): save the file as UTF-8"


def _jsonl_records(file: Path, data: bytes) -> list[tuple[str, Any]]:
    """(file:line, record or JsonlLine with the problem) for every non-empty line."""
    records = []
    for line_number, line, problem in text_lines(data):
        if problem is not None:
            records.append((f"{file}:{line_number}", JsonlLine(None, [problem])))
        elif line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                record = JsonlLine(None, [f"not valid JSON ({error.msg} at column {error.colno})"])
            records.append((f"{file}:{line_number}", record))
    return records


def _llava_records(file: Path, data: bytes) -> list[tuple[str, Any]]:
    """(file:line (record i), record in the cookbook's format or JsonlLine with the problem) per record."""
    text = data.removeprefix(UTF8_BOM).decode("utf-8", errors="surrogateescape")
    decoder, records = json.JSONDecoder(), []
    position = text.index("[") + 1
    while True:
        position = _skip(text, position, " \t\r\n")
        if text.startswith("]", position):
            return records
        try:
            record, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise ValueError(f"{file}:{error.lineno}:{error.colno}: not valid JSON ({error.msg}).") from None
        location = f"{file}:{text.count(chr(10), 0, position) + 1} (record {len(records)})"
        undecodable = NOT_UTF8.search(text, position, end)
        if undecodable:
            line_start = text.rfind("\n", 0, undecodable.start()) + 1
            byte = ord(undecodable.group()) - 0xDC00
            line = text.count("\n", 0, undecodable.start()) + 1
            column = len(text[line_start : undecodable.start()].encode("utf-8", "surrogateescape")) + 1
            records.append((location, JsonlLine(None, [f"line {line}: {_not_utf8(byte, column)}"])))
        else:
            records.append((location, _from_llava(record)))
        position = _skip(text, end, " \t\r\n")
        if text.startswith(",", position):
            position += 1
        elif not text.startswith("]", position):
            line = text.count(chr(10), 0, position) + 1
            raise ValueError(f"{file}:{line}: not valid JSON (expected ',' or ']' after record {len(records) - 1}).")


def _skip(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    return position


LLAVA_IMAGE = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _from_llava(record: Any) -> dict | JsonlLine:
    """A LLaVA record as a cookbook record: each human message with its answer is a turn, and the images
    its ``<image>`` placeholders stand for go with that turn (tags first, as Phi-3.5-V's prompts have them).
    A record whose text has no placeholder gives all its images to the first turn."""
    if not isinstance(record, dict):
        return JsonlLine(None, ["a record must be a JSON object"])
    images = record.get("images", [record["image"]] if "image" in record else [])
    images = [images] if isinstance(images, str) else images
    messages = record.get("conversations")
    if not isinstance(images, list) or not all(isinstance(path, str) for path in images):
        return JsonlLine(None, ['"image" must be a path, or "images" a list of paths'])
    roles = [LLAVA_ROLES.get(m.get("from")) if isinstance(m, dict) else None for m in messages or []]
    if not messages or len(roles) % 2 or roles != ["user", "assistant"] * (len(roles) // 2):
        return JsonlLine(None, ['"conversations" must alternate {"from": "human"} and {"from": "gpt"} messages'])
    if not all(isinstance(m.get("value"), str) for m in messages):
        return JsonlLine(None, ['every message needs a string "value"'])
    placeholders = sum(m["value"].count(LLAVA_IMAGE) for m in messages[::2])
    if placeholders and placeholders != len(images):
        return JsonlLine(None, [f"{placeholders} {LLAVA_IMAGE} placeholder(s) for {len(images)} image(s)"])
    remaining, turns = list(images), []
    for number, (question, answer) in enumerate(zip(messages[::2], messages[1::2])):
        count = question["value"].count(LLAVA_IMAGE) if placeholders else (len(images) if number == 0 else 0)
        text = " ".join(part.strip() for part in question["value"].split(LLAVA_IMAGE) if part.strip())
        turns.append({"images": remaining[:count], "user": text, "assistant": answer["value"]})
        remaining = remaining[count:]
    return {"id": record.get("id"), "source": "llava", "conversations": turns}


def _jsonl_line_problems(line: JsonlLine) -> list[str]:
    return line.problems


def _checked_line(record: Any, image_dir: Path, stamps: list[str], identities: list[str]) -> JsonlLine:
    """The record with its image paths made absolute, or its problems; each image's stamp (for the
    fingerprint) and path relative to ``image_dir`` with its size (for the identity) are appended."""
    if isinstance(record, JsonlLine):  # already found wrong while reading
        return record
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
                stamp, identity = file_stamps(resolved, str(resolved), resolved.relative_to(image_dir).as_posix())
                stamps.append(stamp)
                identities.append(identity)
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
