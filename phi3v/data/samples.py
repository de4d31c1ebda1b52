"""The training and evaluation datasets: the kept rows of a ``RowSource`` encoded as the model reads them.

Rows come from ``phi3v.data.sources`` (a hub split read with undecoded images) or
``phi3v.data.conversation_files``; they are checked before training by ``phi3v.data.validation``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import RecipeError
from ..models.processing import IGNORE_INDEX
from .conversation import Conversation, as_candidates, conversation_ids
from .images import BadImageError, load_sample_image
from .sources import RowSource

logger = logging.getLogger(__name__)

CHANGED_SINCE_VALIDATION = "It could be read when the data was checked, so it changed on disk since."


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
    naming it, or counts it as skipped (``phi3v.training.guards.UnreadableSamples``). Workers never raise for it."""

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

    def head(self, count: int) -> EvaluationSamples:
        """The first ``count`` samples (all when there are fewer)."""
        return EvaluationSamples(self.source, self.rows[:count], self.conversation, self.processor)

    def references(self, index: int) -> list[str]:
        """The reference answers of sample ``index``, without encoding it."""
        return self.conversation(self.source.rows[self.rows[index]]).references()
