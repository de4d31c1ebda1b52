"""Conversations, the one place prompts are built, the training/evaluation datasets, and data loading.

A ``Conversation`` is a list of turns (user text, assistant answer, the turn's images). Training
examples and evaluation prompts are both made by ``conversation_ids``, so they cannot drift:

    each turn:  <s><|user|>\\n<|image_1|>..<|image_k|>\\n{user}<|end|>\\n<|assistant|>   (processor, labels -100)
                {assistant}<|end|>\\n<|endoftext|>                                     (labels = ids)

For evaluation the last turn's answer is left out and becomes the reference.

Rows come from a ``RowSource`` (``phi3v.sources``): a hub split read with undecoded images, or the
records of a conversation file. They are checked before training by ``phi3v.validate``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from .errors import RecipeError
from .images import BadImageError, ImageRef, load_sample_image
from .modeling import IGNORE_INDEX
from .preemption import start_dataloader_worker
from .processing import IMAGE_TAG

if TYPE_CHECKING:
    from .sources import RowSource

logger = logging.getLogger(__name__)

ANSWER_SUFFIX = "<|end|>\n<|endoftext|>"
CHANGED_SINCE_VALIDATION = "It could be read when the data was checked, so it changed on disk since."


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


@functools.lru_cache(maxsize=8)
def _control_text(tokenizer) -> re.Pattern:
    added = sorted({token.content for token in tokenizer.added_tokens_decoder.values()}, key=len, reverse=True)
    return re.compile("|".join([*map(re.escape, added), IMAGE_TAG.pattern]))


def control_tokens_in(text: str, tokenizer) -> list[str]:
    """The chat format's control tokens written out in ``text`` (``<|end|>``, ``<|user|>``, ``<s>``, an image
    tag, any other token the tokenizer adds): tokenized, they would become the token itself, not text, so an
    answer holding ``<|end|>`` would teach the model to end its turn early and a question could forge a turn."""
    return list(dict.fromkeys(_control_text(tokenizer).findall(text)))


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
    """Token ids (with image placeholders), labels when training, and the turns' pixels concatenated.
    Raises BadImageError, naming the image, when one cannot be read."""
    pixel_values, image_sizes, image_tokens = [], [], []
    numbered = 0
    for turn in conversation.turns:
        counts = []
        if turn.images:
            images = [load_sample_image(numbered + k, ref) for k, ref in enumerate(turn.images, start=1)]
            numbered += len(images)
            processed = processor.image_processor(images)
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
    list of conversations of which one is drawn (with ``sample_rng``) each time the row is seen. ``lengths``
    (tokens per row, from data validation) drive --group_by_length.

    A sample whose image cannot be read although it passed validation (the file changed on disk since)
    becomes a one-token example with nothing to learn, marked ``unreadable``: the trainer stops the run
    naming it, or counts it as skipped (``phi3v.guards.UnreadableSamples``). Workers never raise for it."""

    def __init__(
        self,
        source: RowSource,
        rows: Sequence[int],
        conversation: Callable,
        processor,
        seed: int,
        lengths: Sequence[int] | None = None,
    ):
        self.source, self.rows, self.conversation = source, list(rows), conversation
        self.processor, self.seed, self.epoch = processor, seed, 0
        self.lengths = list(lengths) if lengths is not None else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        candidates = as_candidates(self.conversation(self.source.rows[row]))
        conversation = sample_rng(self.seed, self.epoch, row).choice(candidates)
        try:
            example = encode_conversation(self.processor, conversation, for_training=True)
        except BadImageError as error:
            problem = f"{error} {CHANGED_SINCE_VALIDATION}"
            nothing_to_learn = torch.tensor([self.processor.tokenizer.bos_token_id])
            example = {"input_ids": nothing_to_learn, "labels": torch.full_like(nothing_to_learn, IGNORE_INDEX)}
            example["unreadable"] = {"row": row, "where": self.source.where(row), "problem": problem}
        return {**example, "row": row}

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records of the data it was trained on, to notice a resume on other data."""
        rows = json.dumps([self.source.identity or self.source.fingerprint, self.rows])
        fingerprint = hashlib.sha256(rows.encode()).hexdigest()
        return {"fingerprint": fingerprint, "samples": len(self.rows), "origin": self.source.origin}


class EvaluationSamples(torch.utils.data.Dataset):
    """The kept rows of a source as evaluation prompts, with their position and reference answers."""

    def __init__(self, source: RowSource, rows: Sequence[int], conversation: Callable, processor):
        self.source, self.rows, self.conversation, self.processor = source, list(rows), conversation, processor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        conversation = self.conversation(self.source.rows[self.rows[index]])
        try:
            example = encode_conversation(self.processor, conversation, for_training=False)
        except BadImageError as error:
            where = self.source.where(self.rows[index])
            raise RecipeError(f"Evaluation sample {where}: {error} {CHANGED_SINCE_VALIDATION} Restore the file, or "
                              "check the data again with python -m phi3v.validate.") from None  # fmt: skip
        return {**example, "index": index, "answers": conversation.references()}

    def references(self, index: int) -> list[str]:
        """The reference answers of sample ``index``, without encoding it."""
        return self.conversation(self.source.rows[self.rows[index]]).references()


def evaluation_loader(
    dataset: torch.utils.data.Dataset,
    indices: list[int],
    batch_size: int,
    collate_fn: Callable,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """``dataset[i]`` for i in ``indices``, in order, batched for evaluation, with the original's workers
    (prefetch 2) that leave stop signals to the main process."""
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=batch_size,
        collate_fn=collate_fn,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
        worker_init_fn=partial(start_dataloader_worker, None),
        pin_memory=torch.cuda.is_available(),  # so the copies to the GPU can overlap
    )
