"""Scoring labels by their likelihood: one forward pass per sample and label instead of generation.

For a classification task (Hateful Memes' yes/no, NLVR2's true/false, UCF-101's classes) every label is
scored as the complete answer the model was trained to give, ``{label}<|end|>\\n<|endoftext|>``, after
the sample's prompt: the sum of its tokens' log-probabilities. The best label is the prediction
(``--eval_mode likelihood``), and the labels' probabilities give Hateful Memes its AUROC.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from .data.collators import evaluation_loader
from .data.conversation import ANSWER_SUFFIX
from .models.processing import pad_sequences


def _as_list(examples: list[dict]) -> list[dict]:
    return examples


@torch.no_grad()
def label_log_likelihoods(
    model,
    processor,
    dataset,
    indices: list[int],
    labels: Sequence[str],
    batch_size: int,
    show_progress: bool = False,
    num_workers: int = 0,
) -> list[dict]:
    """[{index, answers, scores}] for ``dataset[i]``, i in ``indices``: ``scores[k]`` is the log-likelihood
    of ``labels[k]``. Sequences are left-padded, so every answer ends at the last position and only the
    logits of the answer positions are computed."""
    answers = [processor.tokenizer(label + ANSWER_SUFFIX, add_special_tokens=False).input_ids for label in labels]
    keep = max(len(ids) for ids in answers) + 1  # the logits that predict the longest answer
    loader = evaluation_loader(dataset, indices, max(1, batch_size), _as_list, num_workers)
    device = next(model.parameters()).device
    results = []
    for examples in tqdm(loader, desc="scoring labels", disable=not show_progress):
        inputs = _label_batch(examples, answers, processor.tokenizer.pad_token_id)
        inputs = {name: value.to(device, non_blocking=True) for name, value in inputs.items()}
        logits = model(**inputs, logits_to_keep=keep).logits  # [samples x labels, keep, vocab]
        log_probs = logits.float().log_softmax(-1)
        for row, example in enumerate(examples):
            scores = []
            for k, ids in enumerate(answers):
                # answer token j sits at position L - n + j and is predicted by the logits one before it
                positions = torch.arange(keep - len(ids) - 1, keep - 1, device=device)
                token_ids = torch.tensor(ids, device=device)
                scores.append(log_probs[row * len(answers) + k, positions, token_ids].sum().item())
            results.append({"index": example["index"], "answers": example["answers"], "scores": scores})
    return results


def _label_batch(examples: list[dict], answers: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Every example's prompt followed by every answer, left-padded; images repeated per answer."""
    sequences = [torch.cat([e["input_ids"], torch.tensor(ids)]) for e in examples for ids in answers]
    input_ids, attention_mask = pad_sequences(sequences, pad_token_id, "left")
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),  # positions count from the first real token
    }
    with_images = [e for e in examples if "pixel_values" in e]
    if with_images:
        repeat = len(answers)
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images for _ in range(repeat)])
        batch["image_sizes"] = torch.cat([e["image_sizes"] for e in with_images for _ in range(repeat)])
    return batch
