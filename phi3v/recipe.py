"""The recipe every script runs: evaluate, train, save, reload, evaluate (spec §1).

A script supplies a ``Task``: how to load its splits, how a row becomes a training or evaluation
``Conversation``, and its metric. Everything else is shared, so the four scripts differ only there.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers

from .args import RecipeArguments, gradient_accumulation_steps
from .data import Conversation, ConversationDataset
from .evaluation import evaluate
from .training import (
    load_model,
    load_processor,
    load_trained_for_evaluation,
    prepare_for_training,
    setup_distributed,
    train_and_save,
)

logger = logging.getLogger("phi3v")


@dataclass
class Task:
    metric: str  # "anls" or "accuracy"
    load_splits: Callable[[Any], tuple[Sequence, Sequence]]  # args -> (train rows, eval rows)
    train_conversation: Callable[[Any], Conversation]
    eval_conversation: Callable[[Any], Conversation]


def _first(rows: Sequence, count: int | None) -> Sequence:
    if count is None or count >= len(rows):
        return rows
    return rows.select(range(count)) if hasattr(rows, "select") else rows[:count]


def _setup_logging(is_main_process: bool) -> None:
    level = logging.INFO if is_main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    logging.getLogger("phi3v").setLevel(level)
    transformers.utils.logging.set_verbosity(
        transformers.logging.WARNING if is_main_process else transformers.logging.ERROR
    )


def run_recipe(task: Task, args: RecipeArguments) -> dict[str, float | None]:
    """Evaluate before training, train and save, evaluate after; returns both scores (rank 0)."""
    state = setup_distributed(args)
    _setup_logging(state.is_main_process)
    accumulation = gradient_accumulation_steps(args.batch_size, state.num_processes, args.batch_size_per_gpu)
    logger.info(
        "World size %d, gradient accumulation %d, per-device batch %d",
        state.num_processes,
        accumulation,
        args.batch_size_per_gpu,
    )
    output_dir = Path(args.output_dir)
    processor = load_processor(args)
    with state.main_process_first():
        train_rows, eval_rows = task.load_splits(args)
    eval_rows = _first(eval_rows, args.max_eval_samples)
    train_set = ConversationDataset(train_rows, task.train_conversation, processor, for_training=True)
    eval_set = ConversationDataset(eval_rows, task.eval_conversation, processor, for_training=False)
    logger.info("%d training samples, %d evaluation samples", len(train_set), len(eval_set))

    run_evaluation = partial(
        evaluate,
        processor=processor,
        dataset=eval_set,
        metric=task.metric,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.dataloader_num_workers,
        max_new_tokens=args.max_new_tokens,
        show_progress=not args.no_tqdm,
    )

    model = load_model(args, quantize=args.use_qlora)
    before = run_evaluation(model, output_file=output_dir / "eval_before.json")
    model = prepare_for_training(model, args)
    model = train_and_save(model, processor, train_set, args, accumulation)
    if args.use_lora or args.uses_zero3:  # free the training model before loading the saved one
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        model = load_trained_for_evaluation(args)
    after = run_evaluation(model, output_file=output_dir / "eval_after.json")
    if state.is_main_process:
        logger.info("%s before training: %.4f, after training: %.4f", task.metric, before, after)
    state.wait_for_everyone()
    state.destroy_process_group()  # a clean exit: gloo threads left running can abort the process
    return {"before": before, "after": after}
