"""Conversations and the one place prompts are built.

A ``Conversation`` is a list of turns (user text, assistant answer, the turn's images). Training
examples and evaluation prompts are both made by ``conversation_ids``, so they cannot drift:

    each turn:  <s><|user|>\\n<|image_1|>..<|image_k|>\\n{user}<|end|>\\n<|assistant|>   (processor, labels -100)
                {assistant}<|end|>\\n<|endoftext|>                                     (labels = ids)

For evaluation the last turn's answer is left out and becomes the reference.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..models.processing import IGNORE_INDEX, IMAGE_TAG
from .images import ImageRef

ANSWER_SUFFIX = "<|end|>\n<|endoftext|>"


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
    """Image tags numbered from 1 in every turn, a newline, then the text, as the original scripts build prompts."""
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


def as_candidates(built: Conversation | list[Conversation]) -> list[Conversation]:
    """What a row becomes for training: one Conversation, or a list of them to draw from."""
    return built if isinstance(built, list) else [built]
