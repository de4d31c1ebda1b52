"""Where a recipe's rows come from: hub datasets, or local mirrors of them, as a ``RowSource``.

A ``RowSource`` is the rows one split reads, in the numbering the user knows (``dataset[i]`` of the hub
split, or the records of a file with their line, see ``phi3v.data.conversation_files``), and the check
each row must pass before it becomes a ``Conversation``. Images stay undecoded here (hub rows keep
``{"bytes", "path"}``, files keep their checked paths): they are decoded where they are used, by
``phi3v.data.images``. Fingerprints (what a cache is keyed by) and identities (what a checkpoint records
of its data) of local files are computed here too.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import datasets

from ..errors import RecipeError
from ..hub import require_local_or_reachable

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


def load_hub_dataset(name_or_path: str, config: str | None, split: str, flag: str, required: Sequence[str]):
    """``datasets.load_dataset`` on a hub id or a local mirror of its repository, with a column check."""
    require_local_or_reachable(
        name_or_path, flag, "`python -m phi3v.synthetic <task> --out DIR` writes one in the hub's layout."
    )
    cache_dir = _local_cache_dir(Path(name_or_path)) if Path(name_or_path).is_dir() else None
    rows = datasets.load_dataset(name_or_path, config, split=split, cache_dir=cache_dir)
    missing = [column for column in required if column not in rows.column_names]
    if missing:
        raise RecipeError(
            f"{flag} {name_or_path!r} (config {config}, split {split}) lacks the column(s) {missing}; it has "
            f"{rows.column_names}. Expected the schema of the hub dataset this recipe reads (docs/data.md)."
        )
    return rows


class UndecodedRows(Sequence):
    """A hub split's rows as plain Python with images left as ``{"bytes", "path"}``: they are decoded where
    they are used, by ``phi3v.data.images`` (read through Arrow, so no copy of the dataset is written)."""

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
    """the_cauldron has only a train split: rows [eval_size:] train, rows [:eval_size] evaluate, as in the
    original scripts. Both sources number rows as the hub's train split does."""
    flag = "--dataset_name_or_path"
    rows = load_hub_dataset(name_or_path, config, "train", flag, ["images", "texts"])
    if len(rows) <= eval_size:
        raise RecipeError(
            f"{flag} {name_or_path!r} ({config}) has {len(rows)} rows, not more than --eval_size "
            f"{eval_size}: nothing would be left to train on. Lower --eval_size."
        )
    source = hub_source(rows, name_or_path, config, "train", flag, images_per_row=images_per_row)
    return source.select(range(eval_size, len(rows))), source.select(range(eval_size))
