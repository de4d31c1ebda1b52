"""Picking the best model while training, run as a user runs it: evaluations at the steps asked for, the best
checkpoint kept, recorded and chosen at the end, the same training steps as without evaluating, early
stopping, the runs table, TensorBoard and an export of the best checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from phi3v.args import parse_args
from phi3v.data.collators import TrainCollator
from phi3v.data.samples import TrainingSamples
from phi3v.errors import RecipeError
from phi3v.exporting import chosen_checkpoint, export
from phi3v.inference import load_trained
from phi3v.runs import main as runs_table
from phi3v.task import load_sources, load_task
from phi3v.training.checkpoints import BEST_CHECKPOINT
from tests.recipes.conftest import launch

DOCVQA = "finetune_hf_trainer_docvqa.py"
EVALUATING = [
    "--eval_steps",
    "2",
    "--save_best",
    "--load_best_model_at_end",
    "--eval_loss",
    "--report_to",
    "tensorboard",
]


def lora_flags(tiny_dir: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(tiny_dir), "--dataset_name_or_path", str(data), "--output_dir", str(output_dir),
        "--use_lora", "--lora_rank", "4", "--max_steps", "8", "--num_crops", "1", "--batch_size", "2",
        "--logging_steps", "1", "--warmup_steps", "1", "--learning_rate", "1e-3", "--max_eval_samples", "3",
        "--max_new_tokens", "3", "--dataloader_num_workers", "2", "--no-tqdm", *extra,
    ]  # fmt: skip


def test_the_best_evaluation_during_training_is_the_final_model(data, tiny_dir, tmp_path, capsys):
    """The issue's command: evaluations at steps 2, 4, 6 and 8, the best one's checkpoint recorded, and the
    model saved and evaluated after training is that checkpoint's, with the best evaluation's score."""
    run = tmp_path / "run"
    launch(DOCVQA, lora_flags(tiny_dir, data["docvqa"], run, *EVALUATING))
    metrics = json.loads((run / "metrics.json").read_text())
    evaluations = metrics["evaluations"]
    assert [e["step"] for e in evaluations] == [2, 4, 6, 8]
    assert all(isinstance(e["anls"], float) and e["samples"] == 3 for e in evaluations)
    scores = [e["anls"] for e in evaluations]
    best_step = evaluations[scores.index(max(scores))]["step"]  # the first of equal scores
    best = json.loads((run / BEST_CHECKPOINT).read_text())
    assert best == {"step": best_step, "metric": "anls", "score": max(scores), "checkpoint": f"checkpoint-{best_step}"}
    assert metrics["best"] == {"step": best_step, "metric": "anls", "score": max(scores)}
    after = json.loads((run / "eval_after.json").read_text())
    assert after["anls"] == max(scores) and after["model_step"] == best_step == metrics["model_step"]
    final, kept = (
        load_file(run / "adapter_model.safetensors"),
        load_file(run / best["checkpoint"] / "adapter_model.safetensors"),
    )
    assert final.keys() == kept.keys() and all(torch.equal(final[name], kept[name]) for name in kept)
    answers = json.loads((run / "evaluations" / f"step-{best_step}.json").read_text())
    assert answers["generated_texts_unique"] == after["generated_texts_unique"]  # the same samples, the same model

    best_loss = next(e["loss"] for e in evaluations if e["step"] == best_step)
    assert best_loss == pytest.approx(validation_loss_of(run, data["docvqa"], tiny_dir), rel=1e-5)

    events = EventAccumulator(str(next(run.glob("runs/*")))).Reload()  # --report_to gets each evaluation
    assert [event.step for event in events.Scalars("eval/anls")] == [2, 4, 6, 8]

    without = tmp_path / "without"  # the same run without evaluating: the same training steps
    launch(DOCVQA, lora_flags(tiny_dir, data["docvqa"], without))
    losses = [step["loss"] for step in json.loads((without / "metrics.json").read_text())["steps"]]
    assert [step["loss"] for step in metrics["steps"]] == losses and len(losses) == 8

    runs_table([str(run), str(without)])
    header, _, *rows = capsys.readouterr().out.splitlines()
    assert "best anls" in header and "best step" in header
    evaluated = next(row for row in rows if row.startswith(str(run)))
    assert f" {best_step} " in evaluated

    exported = export(run, tmp_path / "export", dtype="float32", checkpoint="best")
    assert exported < 1e-4
    newest = max(int(folder.name.split("-")[1]) for folder in run.glob("checkpoint-*"))
    assert chosen_checkpoint(run, "latest").name == f"checkpoint-{newest}"
    with pytest.raises(RecipeError, match="no complete checkpoint-5 .*complete checkpoints: "):
        export(run, tmp_path / "five", checkpoint="5")


def validation_loss_of(run: Path, data: Path, tiny_dir: Path) -> float:
    """The loss the HF model computes on the 3 held-out samples as training examples, per answer token."""
    task = load_task("docvqa")
    args = parse_args(task.arguments, lora_flags(tiny_dir, data, run))
    trained = load_trained(run, device="cpu")
    _, held_out = load_sources(task, args)
    samples = TrainingSamples(held_out, held_out.indices, task.train_conversation, trained.processor, args.seed)
    collate = TrainCollator(trained.processor.tokenizer.pad_token_id)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for index in range(len(samples)):
            batch = {k: v for k, v in collate([samples[index]]).items() if isinstance(v, torch.Tensor)}
            count = (batch["labels"][:, 1:] != -100).sum().item()
            total, tokens = total + trained.model(**batch).loss.item() * count, tokens + count
    return total / tokens


def test_early_stopping_stops_at_the_expected_step(data, tiny_dir, tmp_path):
    """A learning rate too small to change any answer: every evaluation ties the first, so with patience 2
    training stops at the third evaluation, step 6 of 8."""
    run = tmp_path / "run"
    flags = ["--eval_steps", "2", "--early_stopping_patience", "2", "--learning_rate", "1e-9"]
    result = launch(DOCVQA, lora_flags(tiny_dir, data["docvqa"], run, *flags))
    assert "Early stopping at step 6: 2 evaluations without an improvement" in result.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert [e["step"] for e in metrics["evaluations"]] == [2, 4, 6]
    assert metrics["model_step"] == 6 and json.loads((run / "eval_after.json").read_text())["model_step"] == 6
