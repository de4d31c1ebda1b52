"""Evaluation as in the original: greedy answers on every rank's shard, gathered, scored on rank 0.

Each rank takes every world_size-th sample (strided, as the original's shards), generates with left
padding, and all ranks' results are gathered and put back in dataset order; a check makes sure every
sample was answered exactly once, whatever the sample count and world size.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import Levenshtein
import torch
from accelerate import PartialState
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .collators import EvalCollator
from .distributed import gathered
from .preemption import start_dataloader_worker

logger = logging.getLogger(__name__)


def _normalize_prediction(text: str) -> str:
    return text.strip().strip(".")


def anls(predictions: Sequence[str], references: Sequence[Sequence[str]], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity, as the original recipe computes it (spec §1.11).

    Per question: max over references of 1 - NL, where NL = distance / max(len(ref), len(pred)), and 0
    when NL >= threshold. Predictions are stripped of spaces and dots; nothing is lowercased.
    """
    scores = []
    for prediction, answers in zip(predictions, references, strict=True):
        prediction = _normalize_prediction(prediction)
        if not prediction:
            logger.warning("Empty prediction scores 0 (references: %s).", list(answers))
            scores.append(0.0)
            continue
        best = 0.0
        for answer in answers:
            distance = Levenshtein.distance(answer, prediction) / max(len(answer), len(prediction))
            best = max(best, 1.0 - distance if distance < threshold else 0.0)
        scores.append(best)
    return sum(scores) / len(scores)


def accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Exact match after stripping spaces and dots and lowercasing both sides (spec §1.11)."""

    def normalize(text: str) -> str:
        return _normalize_prediction(text).lower()

    hits = [
        any(normalize(prediction) == normalize(answer) for answer in answers)
        for prediction, answers in zip(predictions, references, strict=True)
    ]
    return sum(hits) / len(hits)


def no_score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """--metric none: the answers are written, not scored."""
    return None


METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float | None]] = {
    "anls": anls,
    "accuracy": accuracy,
    "none": no_score,
}


def shard_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    """The strided shard of one rank: rank, rank + world_size, ..."""
    return list(range(rank, num_samples, world_size))


def restore_order(results: list[dict], num_samples: int) -> list[dict]:
    """Sort gathered results by dataset index and check that each sample appears exactly once."""
    ordered = sorted(results, key=lambda r: r["index"])
    indices = [r["index"] for r in ordered]
    if indices != list(range(num_samples)):
        missing = sorted(set(range(num_samples)) - set(indices))
        duplicated = sorted({i for i in indices if indices.count(i) > 1})
        raise RuntimeError(f"Evaluation lost samples {missing[:10]} or answered some twice {duplicated[:10]}.")
    return ordered


@torch.no_grad()
def generate_answers(
    model,
    processor,
    dataset,
    indices: list[int],
    batch_size: int,
    max_new_tokens: int,
    show_progress: bool,
    num_workers: int = 0,
) -> list[dict]:
    """Greedy answers for ``dataset[i]`` for i in ``indices``: [{index, answers, generated_text}]."""
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        collate_fn=EvalCollator(processor.tokenizer.pad_token_id),
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
        worker_init_fn=partial(start_dataloader_worker, None),
    )
    device = next(model.parameters()).device
    results = []
    for batch in tqdm(loader, desc="evaluating", disable=not show_progress):
        inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=processor.stop_token_ids,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        texts = processor.batch_decode(
            output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        results += [
            {"index": i, "answers": a, "generated_text": t}
            for i, a, t in zip(batch["indices"], batch["answers"], texts)
        ]
    return results


def evaluate(
    model,
    processor,
    dataset,
    metric: str,
    batch_size: int,
    max_new_tokens: int,
    output_file: Path,
    show_progress: bool = True,
    num_workers: int = 0,
) -> float | None:
    """Evaluate on all ranks, write ``output_file`` on rank 0 and return the score there (None elsewhere)."""
    state = PartialState()
    was_training = model.training
    model.eval()
    indices = shard_indices(len(dataset), state.process_index, state.num_processes)
    show_progress = show_progress and state.is_main_process
    results = generate_answers(
        model, processor, dataset, indices, batch_size, max_new_tokens, show_progress, num_workers
    )
    model.train(was_training)
    ordered = restore_order(gathered(results), len(dataset))
    if not state.is_main_process:
        return None
    predictions = [r["generated_text"] for r in ordered]
    references = [r["answers"] for r in ordered]
    score = METRICS[metric](predictions, references)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "answers_unique": references,
        "generated_texts_unique": predictions,
        metric: score,
        "num_samples": len(ordered),
    }
    output_file.write_text(json.dumps(report, indent=2) + "\n")
    if score is None:
        logger.info("%d answers written to %s (not scored)", len(ordered), output_file)
    else:
        logger.info("%s = %.4f on %d samples (%s)", metric, score, len(ordered), output_file)
    return score
