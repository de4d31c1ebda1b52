"""Conversation files: the cookbook's jsonl and LLaVA-style JSON, read into a ``RowSource``.

The two formats are told apart by their first character:
- the cookbook's jsonl (UCF-101 and any custom data): one object per line,
  ``{"id", "source", "conversations": [{"images": [path, ...], "user": str, "assistant": str}, ...]}``;
- LLaVA-style JSON, a list of ``{"id", "image": path or "images": [paths], "conversations":
  [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``.
Image paths are relative to an image folder and may not leave it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from .conversation import Conversation, Turn
from .sources import RowSource, _digest, file_stamps


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
        raise RecipeError(f"{file}: no such file.")
    data = file.read_bytes()
    is_llava = data.removeprefix(UTF8_BOM).lstrip().startswith(b"[")
    parsed = _llava_records(file, data) if is_llava else _jsonl_records(file, data)
    if not parsed:
        raise RecipeError(f"{file} holds no samples.")
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
            raise RecipeError(f"{file}:{error.lineno}:{error.colno}: not valid JSON ({error.msg}).") from None
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
            raise RecipeError(f"{file}:{line}: not valid JSON (expected ',' or ']' after record {len(records) - 1}).")


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
