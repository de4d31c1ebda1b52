"""Runs that survive: a run killed with SIGKILL, or stopped by SIGTERM, and resumed with
--resume_from_checkpoint latest ends exactly where the uninterrupted run of the same seed ends.

The runs resume in the middle of an epoch, with dataloader workers and DocVQA's random choice among
several reference answers, so the data order and every random choice must really be restored."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phi3v.data.synthetic import write_docvqa
from phi3v.training.checkpoints import BEST_CHECKPOINT, MARKER, incompleteness
from tests.conftest import REPO
from tests.recipes.conftest import kill_everything, launch, recipe_command, recipe_env, wait_until

SCRIPT = "finetune_hf_trainer_docvqa.py"
MAX_STEPS = 20
# 24 rows, 4 samples per optimizer step: 6 steps an epoch, so checkpoints 4, 8, ... fall mid-epoch.
RUN_FLAGS = [
    "--num_crops", "1", "--batch_size", "4", "--max_steps", str(MAX_STEPS), "--save_steps", "4",
    "--logging_steps", "1", "--warmup_steps", "2", "--learning_rate", "1e-3", "--seed", "7",
    "--dataloader_num_workers", "2", "--max_eval_samples", "2", "--max_new_tokens", "2", "--no-tqdm",
]  # fmt: skip
MODES = {  # flags, ranks
    "lora": (["--use_lora", "--lora_rank", "8"], 2),
    "full_zero2": ([], 2),
    "frozen_vision_zero2": (["--freeze_vision_model"], 2),
    "qlora": (["--use_qlora", "--lora_rank", "8"], 1),
    "full_zero3": (["--deepspeed", "ds_configs/zero3.json"], 2),
    # micro-batches of 2 grouped by length, CLIP not checkpointed; killed in the second epoch (KILLED_AFTER),
    # whose grouped order must be rebuilt for that epoch on every rank
    "lora_grouped": (
        [
            "--use_lora",
            "--lora_rank",
            "8",
            "--batch_size_per_gpu",
            "2",
            "--group_by_length",
            "--gradient_checkpointing",
            "decoder",
        ],
        2,
    ),
}


# Evaluating during training: each evaluation on 3 samples (uneven over 2 ranks), at steps 4, 8, ...; the run is
# killed after the evaluation and the checkpoint at step 4, and the best model is the final one.
EVALUATING = ["--eval_steps", "4", "--max_eval_samples", "3", "--save_best", "--load_best_model_at_end"]
MODES["lora_eval"] = (MODES["lora"][0] + EVALUATING, 2)
MODES["full_zero2_eval"] = (MODES["full_zero2"][0] + EVALUATING, 2)

# DoRA adapters with rsLoRA scaling, CLIP and the projector at their own learning rates (the run's is 1e-3)
MODES["dora_rslora_part_lrs"] = (
    MODES["lora"][0] + ["--use_dora", "--use_rslora", "--vision_lr", "3e-3", "--projector_lr", "2e-3"],
    2,
)

KILLED_AFTER = {"lora_grouped": 8}  # the checkpoint after which a mode is killed (default 4, mid first epoch)


@pytest.fixture(scope="module")
def docvqa(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume") / "docvqa"
    write_docvqa(folder, num_train=24, num_test=3, answer_variants=3)
    return folder


def flags_for(mode: str, tiny_dir: Path, docvqa: Path, output_dir: Path) -> list[str]:
    common = ["--model_name_or_path", str(tiny_dir), "--dataset_name_or_path", str(docvqa)]
    return [*common, "--output_dir", str(output_dir), *RUN_FLAGS, *MODES[mode][0]]


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, docvqa, tmp_path_factory) -> dict[str, Path]:
    """The reference run of each mode, made once."""
    runs = {}

    def run(mode: str) -> Path:
        if mode not in runs:
            output_dir = tmp_path_factory.mktemp(f"uninterrupted_{mode}")
            launch(SCRIPT, flags_for(mode, tiny_dir, docvqa, output_dir), ranks=MODES[mode][1])
            runs[mode] = output_dir
        return runs[mode]

    return run


def start(mode: str, flags: list[str], log: Path) -> subprocess.Popen:
    command = recipe_command(SCRIPT, flags, MODES[mode][1])
    return subprocess.Popen(command, cwd=REPO, env=recipe_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def logged_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == MAX_STEPS
    return losses


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    adapter = output_dir / "adapter_model.safetensors"
    return load_file(adapter if adapter.exists() else output_dir / "model.safetensors")


def assert_same_run(resumed: Path, reference: Path) -> None:
    assert logged_losses(resumed) == pytest.approx(logged_losses(reference), rel=1e-6, abs=1e-6)
    expected, weights = final_weights(reference), final_weights(resumed)
    assert weights.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], rtol=0, atol=1e-5, msg=name)
    assert (resumed / "eval_after.json").exists()
    selection = [evaluations(run) for run in (resumed, reference)]
    assert selection[0] == selection[1]


def evaluations(run: Path) -> tuple[list, dict | None, int]:
    """The evaluations during training (step, score), the best checkpoint and the step of the final model."""
    metrics = json.loads((run / "metrics.json").read_text())
    best = run / BEST_CHECKPOINT
    history = [(e["step"], e["anls"]) for e in metrics.get("evaluations", [])]
    return history, json.loads(best.read_text()) if best.exists() else None, metrics["model_step"]


@pytest.mark.parametrize("mode", list(MODES))
def test_sigkill_then_resume_latest_equals_the_uninterrupted_run(mode, tiny_dir, docvqa, uninterrupted, tmp_path):
    output_dir = tmp_path / "out"
    flags = flags_for(mode, tiny_dir, docvqa, output_dir)
    log = tmp_path / "killed.log"
    process = start(mode, flags, log)
    checkpoint = output_dir / f"checkpoint-{KILLED_AFTER.get(mode, 4)}"
    wait_until(lambda: (checkpoint / MARKER).exists(), process, log)
    kill_everything(process)
    assert process.returncode != 0 and not (output_dir / "eval_after.json").exists()

    result = launch(SCRIPT, flags + ["--resume_from_checkpoint", "latest"], ranks=MODES[mode][1])
    assert "Resuming from" in result.stderr and "not redone" in result.stderr  # the evaluation before training
    if "--group_by_length" in flags:
        assert "--group_by_length: micro-batches of 2 samples of similar length" in result.stderr
    if "--vision_lr" in flags:  # each part's rate came back with the optimizer state
        optimizer = torch.load(output_dir / f"checkpoint-{MAX_STEPS}" / "optimizer.pt", weights_only=False)
        rates = {group["part"]: group["initial_lr"] for group in optimizer["param_groups"]}
        assert rates == {"language": 1e-3, "vision": 3e-3, "projector": 2e-3}
    assert_same_run(output_dir, uninterrupted(mode))


def test_sigterm_writes_a_checkpoint_and_the_resumed_run_ends_the_same(tiny_dir, docvqa, uninterrupted, tmp_path):
    """torchrun forwards SIGTERM to its ranks: they finish the step, agree on it, save, and exit non-zero."""
    output_dir = tmp_path / "out"
    flags = flags_for("lora", tiny_dir, docvqa, output_dir)
    log = tmp_path / "stopped.log"
    process = start("lora", flags, log)
    wait_until(lambda: log.read_text().count("'loss'") >= 2, process, log)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    output = log.read_text()
    assert process.returncode != 0, output[-3000:]
    stopped = [line for line in output.splitlines() if "Stopped by SIGTERM" in line]
    assert stopped and "--resume_from_checkpoint latest" in stopped[0], output[-3000:]
    checkpoint = Path(stopped[0].split("Stopped by SIGTERM: ")[1].split(" is complete")[0])
    assert incompleteness(checkpoint) is None and not (output_dir / "eval_after.json").exists()
    step = int(checkpoint.name.split("-")[1])
    assert 2 <= step < MAX_STEPS

    launch(SCRIPT, flags + ["--resume_from_checkpoint", "latest"], ranks=2)
    assert_same_run(output_dir, uninterrupted("lora"))


@pytest.mark.parametrize("mode", ["lora", "full_zero2"])
def test_evaluating_during_training_leaves_training_unchanged(mode, uninterrupted):
    """The same losses with evaluations as without; on 2 ranks each evaluation answers its 3 samples once each,
    in dataset order."""
    plain, evaluating = uninterrupted(mode), uninterrupted(f"{mode}_eval")
    assert logged_losses(evaluating) == logged_losses(plain)
    history, best, model_step = evaluations(evaluating)
    assert [step for step, _ in history] == [4, 8, 12, 16, 20]
    assert model_step == best["step"] and (evaluating / best["checkpoint"] / MARKER).exists()
    references = json.loads((evaluating / "eval_before.json").read_text())["answers_unique"]
    for step, _ in history:
        answered = json.loads((evaluating / "evaluations" / f"step-{step}.json").read_text())
        assert answered["num_samples"] == 3 and answered["answers_unique"] == references
