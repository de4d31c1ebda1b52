"""Evaluation as in the original: greedy answers on every rank's shard, gathered, scored on rank 0.

Each rank takes every world_size-th sample (strided, as the original's shards), generates with left
padding, and all ranks' results are gathered and put back in dataset order; a check makes sure every
sample was answered exactly once, whatever the sample count and world size. While ZeRO-3 trains, the
weights are sharded and every forward pass needs every rank: each rank then answers every sample in
lockstep (``generate`` syncs the ranks under ZeRO-3).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import Levenshtein
import torch
from accelerate import PartialState
from tqdm import tqdm
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from .data.collators import EvalCollator, TrainCollator, evaluation_loader
from .distributed import gathered
from .likelihood import label_log_likelihoods
from .models.processing import IGNORE_INDEX

logger = logging.getLogger(__name__)


def _normalize_prediction(text: str) -> str:
    return text.strip().strip(".")


def anls(predictions: Sequence[str], references: Sequence[Sequence[str]], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity, as the original ``finetune_hf_trainer_docvqa.py`` computes it.

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
    """Exact match after stripping spaces and dots and lowercasing both sides, as the original classification
    recipes score."""

    def normalize(text: str) -> str:
        return _normalize_prediction(text).lower()

    hits = [
        any(normalize(prediction) == normalize(answer) for answer in answers)
        for prediction, answers in zip(predictions, references, strict=True)
    ]
    return sum(hits) / len(hits)


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float | None:
    """Area under the ROC curve: the chance that a random positive scores above a random negative, ties
    counting half (the Mann-Whitney statistic, from average ranks). None when one class is absent."""
    num_positive = sum(positives)
    num_negative = len(positives) - num_positive
    if not num_positive or not num_negative:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1  # tied scores share their average rank
        start = end + 1
    positive_ranks = sum(rank for rank, positive in zip(ranks, positives) if positive)
    return (positive_ranks - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative)


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


def in_lockstep() -> bool:
    """Whether the model's weights are sharded over the ranks (ZeRO-3 while training): every forward pass
    then needs every rank, so each rank runs every sample, in the same batches, and keeps its own results
    (the same on every rank) instead of a shard gathered from the others."""
    return is_deepspeed_zero3_enabled() and PartialState().num_processes > 1


def my_samples(num_samples: int) -> list[int]:
    state = PartialState()
    return (
        list(range(num_samples))
        if in_lockstep()
        else shard_indices(num_samples, state.process_index, state.num_processes)
    )


def from_every_rank(results: list) -> list:
    return results if in_lockstep() else gathered(results)


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
    loader = evaluation_loader(
        dataset, indices, batch_size, EvalCollator(processor.tokenizer.pad_token_id), num_workers
    )
    device = next(model.parameters()).device
    results = []
    for batch in tqdm(loader, desc="evaluating", disable=not show_progress):
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
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
    mode: str = "generate",
    positive_label: str | None = None,
    details: dict | None = None,
) -> float | None:
    """Evaluate on all ranks, write ``output_file`` on rank 0 and return the score there (None elsewhere).

    ``mode`` "generate" answers greedily (the original); "likelihood" predicts the label, among the
    evaluation set's reference answers, that the model finds most likely. With ``positive_label`` the
    labels are scored in either mode and the AUROC of that label's probability is reported too. ``details``
    go into ``output_file`` as they are."""
    state = PartialState()
    was_training = model.training
    model.eval()
    indices = my_samples(len(dataset))
    show_progress = show_progress and state.is_main_process
    labels = label_set(dataset) if mode == "likelihood" or positive_label else []
    results = []
    if mode == "generate":
        results = generate_answers(
            model, processor, dataset, indices, batch_size, max_new_tokens, show_progress, num_workers
        )
    if labels:
        scored = label_log_likelihoods(
            model, processor, dataset, indices, labels, batch_size, show_progress, num_workers
        )
        results = _with_scores(results, scored, labels)
    model.train(was_training)
    ordered = restore_order(from_every_rank(results), len(dataset))
    if not state.is_main_process:
        return None
    predictions = [r["generated_text"] for r in ordered]
    references = [r["answers"] for r in ordered]
    score = METRICS[metric](predictions, references)
    report = {"answers_unique": references, "generated_texts_unique": predictions, metric: score}
    report["num_samples"] = len(ordered)
    report |= details or {}
    if labels:
        report |= {"labels": labels, "label_log_likelihoods": [r["scores"] for r in ordered]}
    if positive_label:
        report["auroc"] = _auroc_of(positive_label, labels, ordered)
        logger.info("AUROC (%r against the rest) = %s", positive_label, report["auroc"])
    output_file.parent.mkdir(parents=True, exist_ok=True)
    output_file.write_text(json.dumps(report, indent=2) + "\n")
    if score is None:
        logger.info("%d answers written to %s (not scored)", len(ordered), output_file)
    else:
        logger.info("%s = %.4f on %d samples (%s)", metric, score, len(ordered), output_file)
    return score


@torch.no_grad()
def validation_loss(model, dataset, pad_token_id: int) -> float:
    """The mean cross-entropy per answer token over ``dataset`` (training examples, with labels), as training
    computes it: one forward pass per sample, each rank its strided shard, summed over all ranks (on every rank)."""
    was_training = model.training
    model.eval()
    collate = TrainCollator(pad_token_id)
    device = next(model.parameters()).device
    totals = []
    for index in my_samples(len(dataset)):
        batch = {k: v.to(device) for k, v in collate([dataset[index]]).items() if isinstance(v, torch.Tensor)}
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()  # the answer tokens the model's loss averages
        loss = model(**batch).loss.item() * tokens if tokens else 0.0  # the training loss, per answer token
        totals.append((loss, tokens))
    model.train(was_training)
    everything = from_every_rank(totals)
    return sum(loss for loss, _ in everything) / max(1, sum(tokens for _, tokens in everything))


def label_set(dataset) -> list[str]:
    """The distinct reference answers of the evaluation set: the labels of a classification task."""
    return sorted({answer.strip() for index in range(len(dataset)) for answer in dataset.references(index)})


def _with_scores(generated: list[dict], scored: list[dict], labels: list[str]) -> list[dict]:
    """Generated answers with their label scores, or (likelihood mode) the most likely label as the answer."""
    if not generated:
        return [{**r, "generated_text": labels[max(range(len(labels)), key=r["scores"].__getitem__)]} for r in scored]
    scores = {r["index"]: r["scores"] for r in scored}
    return [{**r, "scores": scores[r["index"]]} for r in generated]


def _auroc_of(positive_label: str, labels: list[str], ordered: list[dict]) -> float | None:
    """AUROC of P(positive label), normalised over the labels, against the references."""
    positive = _normalize_prediction(positive_label).lower()
    matches = [k for k, label in enumerate(labels) if _normalize_prediction(label).lower() == positive]
    if not matches:
        logger.warning("No reference answer is %r: no AUROC.", positive_label)
        return None
    probabilities = [torch.tensor(r["scores"]).softmax(0)[matches].sum().item() for r in ordered]
    truths = [any(_normalize_prediction(a).lower() == positive for a in r["answers"]) for r in ordered]
    return auroc(probabilities, truths)
