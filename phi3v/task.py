"""What a recipe script supplies: its flags, splits, what a row becomes, and its metric (``Task``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .args import RecipeArguments, load_script
from .data.conversation import Conversation
from .data.sources import RowSource
from .data.validation import CheckedData, validate_recipe_data


@dataclass
class Task:
    arguments: type[RecipeArguments]  # the script's flags
    metric: str | None  # "anls" or "accuracy"; None: the script's --metric flag decides
    load_splits: Callable[[Any], tuple[RowSource, RowSource]]  # args -> (training rows, evaluation rows)
    # What a row becomes for training, or a list of conversations of which one is drawn at random each
    # time the row is seen (DocVQA: one per reference answer, as the original's random.choice).
    train_conversation: Callable[[Any], Conversation | list[Conversation]]
    eval_conversation: Callable[[Any], Conversation]
    classification: bool = False  # answers come from a fixed set of labels: --eval_mode likelihood applies
    auroc_label: str | None = None  # score the labels in every evaluation and report this one's AUROC


def load_task(script: str) -> Task:
    """The ``TASK`` of a recipe script, by path or short name ("docvqa" for finetune_hf_trainer_docvqa.py)."""
    return load_script(script).TASK


def load_sources(task: Task, args: RecipeArguments) -> tuple[RowSource, RowSource]:
    """The task's splits, evaluation limited to --max_eval_samples."""
    train, held_out = task.load_splits(args)
    return train, held_out.select(held_out.indices[: args.max_eval_samples])


def validate_task_data(
    task: Task,
    args: RecipeArguments,
    processor,
    train: RowSource,
    held_out: RowSource,
    listing: Path | None = None,
    resumed: bool = False,
) -> CheckedData:
    """Every sample of the task's splits checked, as its flags ask (``phi3v.data.validation``)."""
    return validate_recipe_data(
        train,
        held_out,
        (task.train_conversation, task.eval_conversation),
        processor,
        max_length=args.max_length,
        skip_bad_samples=args.skip_bad_samples,
        show_progress=not args.no_tqdm,
        listing=listing,
        resumed=resumed,
    )
