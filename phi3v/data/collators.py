"""Batching: right padding for training, left padding for generation.

Padding positions are found from the sequence lengths, never by comparing ids with the pad id. The
original built ``attention_mask = input_ids != pad_id`` with pad = ``<|endoftext|>``, the token that
also closes every answer, so each answer's last token was masked out of attention. Here
that token is attended to like any other; only real padding is masked.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from ..models.processing import IGNORE_INDEX, pad_sequences

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # what a stop request (Ctrl-C, Slurm, a launcher) arrives as


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


def start_dataloader_worker(init: Callable[[int], None] | None, worker_id: int) -> None:
    """A dataloader worker leaves stop signals to the main process, which ends it when it is done (and kills
    it when the run fails or exits: ``phi3v.training.failure.end_child_processes``).

    Otherwise Ctrl-C, or Slurm signalling every process of the job, would kill the workers first, and
    PyTorch turns a dead worker into an error in the main process before it can write its checkpoint."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    if init is not None:
        init(worker_id)
