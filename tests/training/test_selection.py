"""Picking the model while it trains, without a model: the best and the patience counter, the callback's
decisions at each step (evaluate, log, save, stop), the random state kept, the flags' checks, the best
checkpoint kept by rotation and copied into the run folder."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import TrainerControl, TrainerState

from phi3v.args import RecipeArguments, parse_args
from phi3v.errors import RecipeError
from phi3v.training.checkpoints import BEST_CHECKPOINT, mark_complete, rotate_checkpoints
from phi3v.training.selection import (
    EvaluationDuringTraining,
    Standing,
    check_evaluation_during_training,
    logged_scores,
    random_state_kept,
    standing_after,
    use_best_checkpoint,
)
from tests.conftest import flip_bytes


def recipe_args(tmp_path: Path, *flags: str) -> RecipeArguments:
    return parse_args(RecipeArguments, ["--output_dir", str(tmp_path), "--use_lora", *flags])


# --- the best so far --------------------------------------------------------------------------------------


def test_the_best_is_the_first_highest_score_and_stale_counts_the_evaluations_after_it():
    scores = [(2, 0.1), (4, 0.5), (6, 0.5), (8, 0.3)]
    assert standing_after(scores, threshold=0.0) == Standing(best_step=4, best_score=0.5, stale=2)
    assert standing_after(scores[:2], threshold=0.0) == Standing(4, 0.5, 0)
    assert standing_after([], threshold=0.0) == Standing(None, None, 0)


def test_a_gain_within_the_threshold_is_no_improvement():
    scores = [(2, 0.50), (4, 0.52), (6, 0.60)]
    assert standing_after(scores, threshold=0.05) == Standing(6, 0.60, 0)
    assert standing_after(scores[:2], threshold=0.05) == Standing(2, 0.50, 1)


def test_for_a_loss_lower_is_better():
    scores = [(2, 1.5), (4, 1.2), (6, 1.3), (8, 1.19)]
    assert standing_after(scores, threshold=0.0, lower_is_better=True) == Standing(8, 1.19, 0)
    assert standing_after(scores, threshold=0.05, lower_is_better=True) == Standing(4, 1.2, 2)


def test_scores_are_read_back_from_the_trainers_log_history():
    history = [
        {"loss": 2.0, "step": 1},
        {"eval_anls": 0.25, "eval_samples": 3, "epoch": 0.5, "step": 2},
        {"loss": 1.5, "step": 2},
        {"eval_accuracy": 0.9, "step": 3},  # another metric's key is not this run's
        {"eval_anls": 0.5, "eval_samples": 3, "epoch": 1.0, "step": 4},
    ]
    assert logged_scores(history, "anls") == [(2, 0.25), (4, 0.5)]


def test_the_random_state_is_put_back_after_an_evaluation():
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    with random_state_kept():
        torch.rand(5), random.random(), np.random.rand(), torch.empty((), dtype=torch.int64).random_()
    after = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    untouched = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(after[0], untouched[0]) and after[1:] == untouched[1:]


# --- the callback's decisions --------------------------------------------------------------------------------


class FakeTrainer:
    """What the callback takes from the Trainer: the model, log() (as Trainer.log: the log history and the
    should_log flag it clears) and the autocast context."""

    def __init__(self, state: TrainerState, control: TrainerControl):
        self.state, self.control, self.model = state, control, torch.nn.Linear(1, 1)
        self.accelerator = SimpleNamespace(unwrap_model=lambda model: model)

    def log(self, logs: dict) -> None:
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control.should_log = False

    def autocast_smart_context_manager(self):
        return contextlib.nullcontext()


def run_steps(
    args: RecipeArguments, scores: dict[int, float], steps: int, state: TrainerState | None = None, max_steps: int = 0
):
    """Drive the callback through ``steps`` optimizer steps as the Trainer does; ``scores`` gives the metric
    at each step. Returns (state, control, callback, [(step, should_save, should_log)], steps evaluated)."""
    evaluated = []

    def evaluate(model, output_file: Path) -> float:
        evaluated.append(int(output_file.stem.split("-")[1]))
        output_file.parent.mkdir(exist_ok=True)
        output_file.write_text(json.dumps({"anls": scores[evaluated[-1]]}))  # as evaluate() reports it
        return scores[evaluated[-1]]

    state = state or TrainerState()
    state.max_steps = max_steps or steps  # the last step is evaluated too
    control = TrainerControl()
    callback = EvaluationDuringTraining(args, "anls", evaluate, num_samples=3)
    callback.attach(FakeTrainer(state, control))
    callback.on_train_begin(args, state, control)
    flags = []
    while state.global_step < steps and not control.should_training_stop:
        control.should_log = control.should_save = False
        state.global_step += 1
        control.should_log = state.global_step % args.logging_steps == 0
        callback.on_step_end(args, state, control)
        flags.append((state.global_step, control.should_save, control.should_log))
        if control.should_save:
            (Path(args.output_dir) / f"checkpoint-{state.global_step}").mkdir()  # what the Trainer writes
            callback.on_save(args, state, control)
    return state, control, callback, flags, evaluated


def test_it_evaluates_every_eval_steps_and_keeps_the_steps_loss_line_due(tmp_path):
    args = recipe_args(tmp_path, "--eval_steps", "2", "--logging_steps", "1")
    state, control, _, flags, evaluated = run_steps(args, {2: 0.1, 4: 0.2, 6: 0.3}, steps=6)
    assert evaluated == [2, 4, 6]
    assert logged_scores(state.log_history, "anls") == [(2, 0.1), (4, 0.2), (6, 0.3)]
    assert all(should_log for _, _, should_log in flags)  # Trainer.log cleared it; the callback put it back
    assert not any(should_save for _, should_save, _ in flags)  # no --save_best
    assert json.loads((tmp_path / "metrics.json").read_text())["best"] == {"step": 6, "metric": "anls", "score": 0.3}


def test_save_best_asks_for_a_checkpoint_at_each_new_best_and_records_it(tmp_path):
    args = recipe_args(tmp_path, "--eval_steps", "2", "--save_best")
    _, _, _, flags, _ = run_steps(args, {2: 0.1, 4: 0.4, 6: 0.2, 8: 0.4, 10: 0.5}, steps=10)
    assert [step for step, should_save, _ in flags if should_save] == [2, 4, 10]
    record = json.loads((tmp_path / BEST_CHECKPOINT).read_text())
    assert record == {"step": 10, "metric": "anls", "score": 0.5, "checkpoint": "checkpoint-10"}


def test_with_metric_for_best_model_loss_the_lowest_validation_loss_is_the_best(tmp_path):
    args = recipe_args(tmp_path, "--eval_steps", "2", "--save_best", "--eval_loss", "--metric_for_best_model", "loss")
    losses = iter([3.0, 2.0, 2.5])

    def evaluate(model, output_file: Path) -> float:
        output_file.parent.mkdir(exist_ok=True)
        output_file.write_text(json.dumps({"anls": 0.5, "auroc": 0.75}))
        return 0.5

    state, control = TrainerState(), TrainerControl()
    callback = EvaluationDuringTraining(args, "anls", evaluate, num_samples=3, loss=lambda model: next(losses))
    callback.attach(FakeTrainer(state, control))
    saved = []
    for step in (2, 4, 6):
        state.global_step, control.should_save = step, False
        callback.on_step_end(args, state, control)
        saved += [step] if control.should_save else []
    assert saved == [2, 4] and logged_scores(state.log_history, "anls") == [(2, 0.5), (4, 0.5), (6, 0.5)]
    assert logged_scores(state.log_history, "loss") == [(2, 3.0), (4, 2.0), (6, 2.5)]
    assert logged_scores(state.log_history, "auroc") == [(2, 0.75), (4, 0.75), (6, 0.75)]  # reported: logged too
    assert json.loads((tmp_path / "metrics.json").read_text())["best"] == {"step": 4, "metric": "loss", "score": 2.0}


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path):
    args = recipe_args(tmp_path, "--eval_steps", "2", "--early_stopping_patience", "2")
    state, control, _, _, evaluated = run_steps(args, {2: 0.3, 4: 0.5, 6: 0.5, 8: 0.4, 10: 0.9}, steps=20)
    assert control.should_training_stop and state.global_step == 8 and evaluated == [2, 4, 6, 8]


def test_a_resumed_run_continues_with_the_evaluations_in_its_checkpoints_history(tmp_path):
    """Patience counted before the interruption still counts after it; the best record is rewritten from the
    history (an abandoned future's best, here step 10, is forgotten)."""
    args = recipe_args(tmp_path, "--eval_steps", "2", "--early_stopping_patience", "2", "--save_best")
    scores = {2: 0.3, 4: 0.5, 6: 0.4, 8: 0.1, 10: 0.9}
    (tmp_path / BEST_CHECKPOINT).write_text(json.dumps({"step": 10, "checkpoint": "checkpoint-10"}))
    (tmp_path / "checkpoint-4").mkdir()
    resumed = TrainerState(global_step=6, log_history=[{"eval_anls": 0.3, "step": 2}, {"eval_anls": 0.5, "step": 4},
                                                        {"eval_anls": 0.4, "step": 6}])  # fmt: skip
    state, control, callback, _, evaluated = run_steps(args, scores, steps=20, state=resumed)
    assert evaluated == [8] and state.global_step == 8 and control.should_training_stop
    assert json.loads((tmp_path / BEST_CHECKPOINT).read_text())["step"] == 4


def test_epoch_evaluation_runs_at_each_epochs_end_and_at_the_last_step(tmp_path):
    """state.epoch is whole at an epoch's last optimizer step; --max_steps may end training mid-epoch."""
    args = recipe_args(tmp_path, "--eval_strategy", "epoch")
    evaluated = []

    def evaluate(model, output_file: Path) -> float:
        evaluated.append(int(output_file.stem.split("-")[1]))
        output_file.parent.mkdir(exist_ok=True)
        output_file.write_text(json.dumps({"anls": 0.5}))
        return 0.5

    state, control = TrainerState(max_steps=10), TrainerControl()
    callback = EvaluationDuringTraining(args, "anls", evaluate, 3)
    callback.attach(FakeTrainer(state, control))
    for step in range(1, 11):
        state.global_step, state.epoch = step, step / 4  # 4 steps an epoch
        callback.on_step_end(args, state, control)
    assert evaluated == [4, 8, 10]


def test_a_stop_signal_saves_first_and_the_resumed_run_evaluates_that_step(tmp_path):
    """The checkpoint of a stop is not delayed by an evaluation; the resumed run makes it up before training."""
    args = recipe_args(tmp_path, "--eval_steps", "2", "--save_best")
    stop = SimpleNamespace(stopped_at_step=None)
    scores = {2: 0.1, 4: 0.5, 6: 0.2}
    state, control, callback, _, evaluated = run_steps(args, scores, steps=3, max_steps=6)
    callback.stop_request = stop
    state.global_step, stop.stopped_at_step = 4, 4  # SIGTERM during step 4
    callback.on_step_end(args, state, control)
    assert evaluated == [2]
    (tmp_path / "checkpoint-4").mkdir()  # written for the stop

    resumed = TrainerState(global_step=4, max_steps=6, log_history=list(state.log_history))
    _, _, _, _, evaluated_after = run_steps(args, scores, steps=6, state=resumed)
    assert evaluated_after == [4, 6]  # step 4 at the start, then as usual
    assert json.loads((tmp_path / BEST_CHECKPOINT).read_text())["step"] == 4


def test_a_best_without_its_checkpoint_is_not_recorded(tmp_path, caplog):
    """Resuming with --save_best a run that saved no bests: the record never names a missing folder."""
    args = recipe_args(tmp_path, "--eval_steps", "2", "--save_best")
    resumed = TrainerState(global_step=4, log_history=[{"eval_anls": 0.5, "step": 2}, {"eval_anls": 0.3, "step": 4}])
    run_steps(args, {6: 0.4}, steps=6, state=resumed)
    assert not (tmp_path / BEST_CHECKPOINT).exists() and "has no checkpoint" in caplog.text


# --- the flags ----------------------------------------------------------------------------------------------


def test_eval_steps_implies_the_steps_strategy_and_load_best_implies_save_best(tmp_path):
    args = recipe_args(tmp_path, "--eval_steps", "5", "--load_best_model_at_end")
    assert (args.eval_strategy, args.save_best, args.evaluates_during_training) == ("steps", True, True)
    assert not recipe_args(tmp_path).evaluates_during_training  # the original: only before and after


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--save_best"], "--save_best acts on evaluations during training"),
        (["--load_best_model_at_end"], "--load_best_model_at_end acts on evaluations during training"),
        (["--early_stopping_patience", "2"], "--early_stopping_patience acts on evaluations"),
        (["--eval_strategy", "steps"], "needs --eval_steps N"),
        (["--eval_strategy", "epoch", "--eval_steps", "3"], "pick one"),
        (["--eval_steps", "0"], "--eval_steps must be at least 1"),
        (["--eval_steps", "10", "--max_steps", "8"], "no evaluation would run"),
        (["--eval_steps", "2", "--early_stopping_threshold", "-1"], "--early_stopping_threshold must be 0 or more"),
        (["--eval_steps", "2", "--metric_for_best_model", "loss"], "add --eval_loss"),
        (["--eval_loss"], "--eval_loss is computed with the evaluations during training"),
    ],
)
def test_flags_that_cannot_work_are_refused_when_parsed(tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit):
        recipe_args(tmp_path, *flags)
    assert message in capsys.readouterr().err


def test_what_evaluation_during_training_cannot_do_is_refused_before_loading(tmp_path):
    with pytest.raises(RecipeError, match="--metric none"):
        check_evaluation_during_training(recipe_args(tmp_path, "--eval_steps", "2"), "none")
    with pytest.raises(RecipeError, match="this recipe scores anls; give anls or loss"):
        check_evaluation_during_training(recipe_args(tmp_path, "--eval_steps", "2", "--metric_for_best_model", "f1"),
                                         "anls")  # fmt: skip
    check_evaluation_during_training(recipe_args(tmp_path, "--eval_steps", "2"), "anls")  # LoRA: fine


# --- the best checkpoint on disk ----------------------------------------------------------------------------


def write_checkpoint(output_dir: Path, step: int) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(f"weights of step {step}".encode())
    (folder / "adapter_config.json").write_text(json.dumps({"step": step}))
    (folder / "optimizer.pt").write_bytes(b"o" * 10)
    mark_complete(folder)
    return folder


def record_best(output_dir: Path, step: int) -> None:
    record = {"step": step, "metric": "anls", "score": 0.5, "checkpoint": f"checkpoint-{step}"}
    (output_dir / BEST_CHECKPOINT).write_text(json.dumps(record))


def test_rotation_keeps_the_best_checkpoint(tmp_path):
    for step in (2, 4, 6, 8):
        write_checkpoint(tmp_path, step)
    record_best(tmp_path, 4)
    rotate_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]


def test_the_best_checkpoints_model_replaces_the_final_one(tmp_path):
    write_checkpoint(tmp_path, 4)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"final weights")
    record_best(tmp_path, 4)
    assert use_best_checkpoint(tmp_path)["step"] == 4
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == b"weights of step 4"
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == {"step": 4}
    assert not (tmp_path / "optimizer.pt").exists()  # the model only


def test_a_damaged_best_checkpoint_is_refused_and_the_final_model_stays(tmp_path):
    folder = write_checkpoint(tmp_path, 4)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"final weights")
    record_best(tmp_path, 4)
    flip_bytes(folder / "adapter_model.safetensors")
    with pytest.raises(RecipeError, match="checkpoint-4 cannot be used .*does not match the checksum"):
        use_best_checkpoint(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == b"final weights"


def test_without_any_evaluation_the_final_model_stays(tmp_path, caplog):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"final weights")
    assert use_best_checkpoint(tmp_path) is None
    assert "no evaluation ran during training" in caplog.text
