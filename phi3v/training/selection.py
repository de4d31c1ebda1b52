"""Choosing the model while it trains: the recipe's own metric evaluated during training, the best
checkpoint kept and chosen, early stopping.

The evaluation is the one after training (``phi3v.evaluation.evaluate``: greedy answers or label
likelihoods, sharded over the ranks and gathered), run from a Trainer callback on the first
--eval_samples_during_training held-out samples. Its score goes through ``Trainer.log``, so it reaches the
console, ``metrics.json``, the --report_to integrations and ``trainer_state.json``'s log history, which
every checkpoint holds: on resume the evaluations so far, the best and the patience counter are rebuilt
from that history, so a resumed run decides exactly as the uninterrupted one. The random state is put
back after each evaluation, so a run that evaluates takes the same training steps as one that does not.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from ..args import RecipeArguments
from ..distributed import barrier, decided_on_main, from_main_process
from ..errors import RecipeError
from ..report import update_metrics
from .checkpoints import BEST_CHECKPOINT, EVALUATIONS, best_checkpoint, corruption, incompleteness
from .preemption import StopRequest

logger = logging.getLogger(__name__)

# What a checkpoint holds of the model itself (a LoRA run's adapters, or a full model's weights and config),
# as ``Trainer.save_model`` writes it to --output_dir.
MODEL_FILES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
)


@dataclass(frozen=True)
class Standing:
    """Where the evaluations so far leave the run."""

    best_step: int | None = None
    best_score: float | None = None
    stale: int = 0  # evaluations since the best one that did not improve on it


def improves(score: float, best: float | None, threshold: float, lower_is_better: bool = False) -> bool:
    """Better by more than ``threshold``: higher, or lower for a loss (the first score always improves)."""
    return best is None or (best - score if lower_is_better else score - best) > threshold


def standing_after(scores: list[tuple[int, float]], threshold: float, lower_is_better: bool = False) -> Standing:
    """The best (step, score) of ``scores`` (in step order) and how many evaluations followed it."""
    standing = Standing()
    for step, score in scores:
        if improves(score, standing.best_score, threshold, lower_is_better):
            standing = Standing(step, score, 0)
        else:
            standing = Standing(standing.best_step, standing.best_score, standing.stale + 1)
    return standing


def logged_scores(log_history: list[dict[str, Any]], metric: str) -> list[tuple[int, float]]:
    """(step, score) of every evaluation during training in the Trainer's log history (``metric``: the
    recipe's metric, or loss)."""
    key = f"eval_{metric}"
    return [(entry["step"], entry[key]) for entry in log_history if key in entry]


@contextlib.contextmanager
def random_state_kept() -> Iterator[None]:
    """Every random generator training draws from, as it was before (a dataloader's iterator draws its
    seed from torch's generator, for one)."""
    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def check_evaluation_during_training(args: RecipeArguments, metric: str) -> None:
    """Refuse, before anything loads, what evaluation during training cannot do."""
    if not args.evaluates_during_training:
        return
    if metric == "none":
        raise RecipeError("--metric none writes answers without a score: there is nothing to pick the best model "
                          "by. Pick a --metric, or drop --eval_steps / --eval_strategy.")  # fmt: skip
    if args.metric_for_best_model not in ("", metric, "loss"):
        raise RecipeError(f"--metric_for_best_model {args.metric_for_best_model}: this recipe scores {metric}; "
                          f"give {metric} or loss (with --eval_loss).")  # fmt: skip


class EvaluationDuringTraining(TrainerCallback):
    """Evaluates every --eval_steps optimizer steps or at each epoch's end, logs the score, asks for a
    checkpoint at a new best (--save_best) and stops after --early_stopping_patience evaluations without
    improvement. ``evaluate(model, output_file)`` scores the model (on rank 0, None elsewhere);
    ``loss(model)``, with --eval_loss, gives the validation loss (on every rank)."""

    def __init__(
        self,
        args: RecipeArguments,
        metric: str,
        evaluate: Callable[..., float | None],
        num_samples: int,
        loss: Callable[..., float] | None = None,
    ):
        self.args, self.metric, self.evaluate, self.num_samples, self.loss = args, metric, evaluate, num_samples, loss
        self.compared = args.metric_for_best_model or metric  # what picks the best: the metric, or loss
        self.output_dir = Path(args.output_dir)
        self.trainer = None  # set by ``attach``: the model, ``log`` and the autocast context come from it
        self.stop_request: StopRequest | None = None

    def attach(self, trainer, stop_request: StopRequest | None = None) -> None:
        self.trainer, self.stop_request = trainer, stop_request

    def _standing(self, state) -> Standing:
        """From the evaluations in the Trainer's log history: a resumed run's include those before the resume."""
        scores = logged_scores(state.log_history, self.compared)
        return standing_after(scores, self.args.early_stopping_threshold, self.compared == "loss")

    def on_train_begin(self, args, state, control, **kwargs):
        evaluated = dict(logged_scores(state.log_history, self.compared))  # a resumed run's evaluations so far
        if evaluated and state.is_world_process_zero:
            standing = self._standing(state)
            logger.info("Resuming with %d evaluations during training; the best %s is %.4f at step %d",
                        len(evaluated), self.compared, standing.best_score, standing.best_step)  # fmt: skip
            update_metrics(self.output_dir, best=self._best(standing))
        if self._due(state) and state.global_step not in evaluated:
            self._evaluate(state, control)  # the evaluation a stop signal skipped at the checkpoint resumed from
        if self.args.save_best and state.is_world_process_zero:
            self._record_best(self._standing(state))  # the record may name a later checkpoint, of an abandoned future
        return control

    def on_step_end(self, args, state, control, **kwargs):
        stopping = self.stop_request is not None and self.stop_request.stopped_at_step == state.global_step
        if self._due(state) and not stopping:  # a stop signal: the checkpoint first, this evaluation on resume
            self._evaluate(state, control)
        return control

    def _due(self, state) -> bool:
        """Every --eval_steps steps or at each epoch's end, and at the last step (as the HF Trainer)."""
        if state.global_step == 0:
            return False
        if self.args.eval_strategy == "steps":
            periodic = state.global_step % self.args.eval_steps == 0
        else:  # "epoch": state.epoch is whole at an epoch's last optimizer step, fractional elsewhere
            periodic = state.epoch is not None and abs(state.epoch - round(state.epoch)) < 1e-6
        return periodic or state.global_step >= state.max_steps

    def on_save(self, args, state, control, **kwargs):
        standing = self._standing(state)
        if self.args.save_best and standing.best_step == state.global_step and state.is_world_process_zero:
            self._record_best(standing)
        return control

    def _evaluate(self, state, control) -> None:
        step = state.global_step
        if state.is_world_process_zero:
            logger.info("Evaluating at step %d on %d held-out samples", step, self.num_samples)
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        output_file = self.output_dir / EVALUATIONS / f"step-{step}.json"
        with random_state_kept(), self.trainer.autocast_smart_context_manager():
            score = self.evaluate(model, output_file=output_file)
            logs = from_main_process(_scores(score, output_file, self.metric) if state.is_world_process_zero else None)
            if self.loss is not None:
                logs["eval_loss"] = self.loss(model)
        should_log = control.should_log
        self.trainer.log({**logs, "eval_samples": self.num_samples})  # into state.log_history, on every rank
        control.should_log = should_log  # Trainer.log clears it: the step's own loss line is still due
        self._act_on(self._standing(state), state, control)

    def _act_on(self, standing: Standing, state, control) -> None:
        """Record the best so far; ask for its checkpoint when it is new (--save_best); stop when patience is out."""
        step = state.global_step
        if state.is_world_process_zero:
            update_metrics(self.output_dir, best=self._best(standing))
        if standing.best_step == step and self.args.save_best:
            control.should_save = True
            if state.is_world_process_zero:
                logger.info("New best %s %.4f at step %d: writing its checkpoint", self.compared,
                            standing.best_score, step)  # fmt: skip
        patience = self.args.early_stopping_patience
        if patience is not None and standing.stale >= patience:
            control.should_training_stop = True
            if state.is_world_process_zero:
                logger.warning(
                    "Early stopping at step %d: %d evaluations without an improvement of more than %g on the best "
                    "%s, %.4f at step %d (--early_stopping_patience %d).",
                    step, standing.stale, self.args.early_stopping_threshold, self.compared, standing.best_score,
                    standing.best_step, patience,
                )  # fmt: skip

    def _best(self, standing: Standing) -> dict[str, Any]:
        return {"step": standing.best_step, "metric": self.compared, "score": standing.best_score}

    def _record_best(self, standing: Standing) -> None:
        folder = self.output_dir / f"checkpoint-{standing.best_step}"
        if standing.best_step is not None and not folder.is_dir():
            logger.warning("--save_best: the best evaluation so far (%s %.4f at step %d) has no checkpoint (it was "
                           "removed, or written without --save_best): a later evaluation must beat it to be kept.",
                           self.compared, standing.best_score, standing.best_step)  # fmt: skip
        if standing.best_step is None or not folder.is_dir():
            (self.output_dir / BEST_CHECKPOINT).unlink(missing_ok=True)
            return
        record = {
            "step": standing.best_step,
            "metric": self.compared,
            "score": standing.best_score,
            "checkpoint": f"checkpoint-{standing.best_step}",
        }
        partial = self.output_dir / f"{BEST_CHECKPOINT}.partial"
        partial.write_text(json.dumps(record, indent=2) + "\n")
        partial.replace(self.output_dir / BEST_CHECKPOINT)


def is_model_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FILES)


def _scores(score: float, output_file: Path, metric: str) -> dict[str, float]:
    """The metric, and Hateful Memes' AUROC when the evaluation reported one."""
    auroc = json.loads(output_file.read_text()).get("auroc")
    return {f"eval_{metric}": score, **({"eval_auroc": auroc} if auroc is not None else {})}


def use_best_checkpoint(output_dir: str | Path) -> dict[str, Any] | None:
    """Replace the model in ``output_dir`` by its best checkpoint's (checked complete and intact first);
    returns the best checkpoint's record, or None when no evaluation ran (the final model stays). Decided
    on the main process, the same on every rank."""
    best = decided_on_main(lambda: _copy_best_model(Path(output_dir)))
    barrier()
    return best


def _copy_best_model(output_dir: Path) -> dict[str, Any] | None:
    record = best_checkpoint(output_dir)
    if record is None:
        logger.warning("--load_best_model_at_end: no evaluation ran during training (%s is missing), so the model in "
                       "%s is the last step's.", BEST_CHECKPOINT, output_dir)  # fmt: skip
        return None
    folder = output_dir / record["checkpoint"]
    problem = (
        (incompleteness(folder) or corruption(folder, names=is_model_file)) if folder.is_dir() else "no such folder"
    )
    if problem is not None:
        raise RecipeError(
            f"--load_best_model_at_end: the best checkpoint {folder} cannot be used ({problem}). The last step's "
            f"model is in {output_dir}, not evaluated; export another checkpoint with python -m phi3v.export "
            f"--model {output_dir} --checkpoint STEP."
        )
    for pattern in MODEL_FILES:
        for stale in output_dir.glob(pattern):
            stale.unlink()
        for file in folder.glob(pattern):
            shutil.copyfile(file, output_dir / file.name)
    logger.info("--load_best_model_at_end: the model in %s is now %s's (%s %.4f)", output_dir, folder.name,
                record["metric"], record["score"])  # fmt: skip
    return record
