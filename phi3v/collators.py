"""Batching: right padding for training, left padding for generation.

Padding positions are found from the sequence lengths, never by comparing ids with the pad id. The
original built ``attention_mask = input_ids != pad_id`` with pad = ``<|endoftext|>``, the token that
also closes every answer, so each answer's last token was masked out of attention (spec §1.5). Here
that token is attended to like any other; only real padding is masked.
"""

from __future__ import annotations

from typing import Any

import torch

from .data import IGNORE_INDEX
from .processing import pad_sequences


def _images(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    # The model fills placeholders in row-major order, so images are concatenated in example order.
    with_images = [e for e in examples if "pixel_values" in e]
    if not with_images:
        return {}
    return {
        "pixel_values": torch.cat([e["pixel_values"] for e in with_images]),
        "image_sizes": torch.cat([e["image_sizes"] for e in with_images]),
    }


class TrainCollator:
    """input_ids and labels padded on the right (labels with -100), attention_mask, pixels.

    Pixels are handed over in ``pixel_dtype``, the dtype the vision tower computes in (bf16/fp16 mixed
    precision casts them there anyway, with the same rounding), which halves what is copied to the GPU."""

    def __init__(self, pad_token_id: int, pixel_dtype: torch.dtype = torch.float32):
        self.pad_token_id, self.pixel_dtype = pad_token_id, pixel_dtype

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_sequences([e["input_ids"] for e in examples], self.pad_token_id, "right")
        labels, _ = pad_sequences([e["labels"] for e in examples], IGNORE_INDEX, "right")
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **_images(examples)}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.pixel_dtype)
        if "row" in examples[0]:  # where the samples came from, for messages about them (not a model input)
            batch["rows"] = [e["row"] for e in examples]
        unreadable = [e["unreadable"] for e in examples if "unreadable" in e]
        if unreadable:  # samples whose image could not be read (phi3v.data.TrainingSamples); not a model input
            batch["unreadable"] = unreadable
        return batch


class EvalCollator:
    """Prompts padded on the left for ``generate``, with their dataset indices and reference answers."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, attention_mask = pad_sequences([e["input_ids"] for e in examples], self.pad_token_id, "left")
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            **_images(examples),
            "indices": [e["index"] for e in examples],
            "answers": [e["answers"] for e in examples],
        }
