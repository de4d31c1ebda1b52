"""The checks one row must pass before training, and running them over many rows in worker processes.

For each row: its schema (hub columns, or the jsonl line: UTF-8, JSON, keys, image paths inside the image
folder); every conversation it can become (DocVQA: one per reference answer): text fields, no empty answer,
no control token of the chat format written out in the text, image tags that match the images; every image
decoded once (its size gives its token count); the sample's length in tokens.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from ..models.processing import IGNORE_INDEX, IMAGE_TAG
from .conversation import Conversation, as_candidates, control_tokens_in, conversation_ids
from .images import BadImageError, image_label, load_image
from .sources import RowSource


@dataclass
class SampleCheck:
    row: int  # the row of the source (dataset[row], or the jsonl line's index)
    tokens: int = 0  # longest sequence the row can become (training: prompt and answer), 0 if unreadable
    supervised: int = 0  # fewest supervised tokens among what the row can become (training)
    images: int = 0  # images decoded
    problems: list[str] = field(default_factory=list)


def check_row(source: RowSource, row: int, build: Callable, processor, for_training: bool) -> SampleCheck:
    """Everything that can be known about one row before training, without raising."""
    check = SampleCheck(row)
    try:
        item = source.rows[row]
        check.problems = list(source.schema_problems(item))  # a copy: problems are added to it below
        if check.problems:
            return check
        built = build(item)
    except Exception as error:  # a row the recipe's builder cannot read: report it, whatever it is
        check.problems = [f"cannot be read as a sample ({type(error).__name__}: {error})"]
        return check
    candidates = as_candidates(built)
    image_tokens = _check_images(candidates, processor, check)
    if check.problems:
        return check
    supervised = []
    for candidate in candidates:
        problems = _text_problems(candidate, for_training, processor.tokenizer)
        if not problems:
            counts = [[image_tokens[id(ref)] for ref in turn.images] for turn in candidate.turns]
            try:
                input_ids, labels = conversation_ids(processor, candidate, counts, for_training)
                check.tokens = max(check.tokens, len(input_ids))
                supervised.append(sum(label != IGNORE_INDEX for label in labels))
            except ValueError as error:  # image tags in the text that do not match the images
                problems.append(str(error))
        check.problems += [p for p in problems if p not in check.problems]
    check.supervised = min(supervised, default=0)
    return check


def _check_images(candidates: list[Conversation], processor, check: SampleCheck) -> dict[int, int]:
    """Decode each distinct image of the row once; returns its token count by id(ref)."""
    tokens: dict[int, int] = {}
    for candidate in candidates:
        refs = [ref for turn in candidate.turns for ref in turn.images]
        for number, ref in enumerate(refs, start=1):
            if id(ref) in tokens:
                continue
            tokens[id(ref)] = 0
            try:
                width, height = load_image(ref).size
                check.images += 1
                tokens[id(ref)] = processor.image_processor.num_tokens_for_size(width, height)
            except (BadImageError, ValueError) as error:
                check.problems.append(f"{image_label(number, ref)}: {error}")
    return tokens


def _text_problems(conversation: Conversation, for_training: bool, tokenizer) -> list[str]:
    problems = []
    for number, turn in enumerate(conversation.turns, start=1):
        if not isinstance(turn.user, str) or not isinstance(turn.assistant, str):
            problems.append(f"turn {number}: the question and the answer must be text")
            continue
        if for_training and not turn.assistant.strip():
            problems.append(f"turn {number}: empty answer (nothing to learn): fill it in or drop the sample")
        tokenized = {"question": turn.user}
        if for_training or number < len(conversation.turns):  # an evaluation's last answer is its reference
            tokenized["answer"] = turn.assistant
        for role, text in tokenized.items():
            for token in control_tokens_in(text, tokenizer):
                problems.append(_control_token_problem(number, role, token))
    references = conversation.references()
    if not for_training and not any(isinstance(a, str) and a.strip() for a in references):
        problems.append("no non-empty reference answer to score against")
    return problems


def _control_token_problem(turn: int, role: str, token: str) -> str:
    if IMAGE_TAG.fullmatch(token):
        return (f"turn {turn}: the {role} holds the image tag {token}; image tags are added from the turn's "
                "images: remove it from the text")  # fmt: skip
    return (f"turn {turn}: the {role} holds {token}, which the tokenizer reads as the chat format's control "
            "token, not as text: remove it from the text, or drop the sample")  # fmt: skip


_JOB: tuple | None = None  # (source, build, processor, for_training), inherited by forked workers


def _start_worker(job: tuple) -> None:
    global _JOB
    _JOB = job
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one tokenizer thread per worker process


def _check_chunk(rows: list[int]) -> list[SampleCheck]:
    source, build, processor, for_training = _JOB
    return [check_row(source, row, build, processor, for_training) for row in rows]


def check_rows(
    source: RowSource,
    rows: Sequence[int],
    build: Callable,
    processor,
    for_training: bool,
    workers: int,
    description: str,
    show_progress: bool = True,
) -> list[SampleCheck]:
    """check_row over ``rows`` with ``workers`` processes (forked, so they share the loaded data)."""
    chunks = [list(rows[i : i + CHUNK_SIZE]) for i in range(0, len(rows), CHUNK_SIZE)]
    job = (source, build, processor, for_training)
    results: list[SampleCheck] = []
    with tqdm(total=len(rows), desc=description, unit="sample", disable=not show_progress) as bar:
        if workers <= 1 or len(chunks) <= 1:
            _start_worker(job)
            batches = map(_check_chunk, chunks)
            for batch in batches:
                results += batch
                bar.update(len(batch))
            return results
        with multiprocessing.get_context("fork").Pool(workers, _start_worker, (job,)) as pool:
            for batch in pool.imap(_check_chunk, chunks):
                results += batch
                bar.update(len(batch))
    return results


CHUNK_SIZE = 32  # rows a worker takes at a time
