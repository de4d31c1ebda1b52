"""The recipe every script runs: check, evaluate, train, save, reload, evaluate, as the original scripts do.

A script supplies a ``Task``: its flags, how to load its splits, what a row becomes for training and
for evaluation, and its metric. Everything else is shared, so the scripts differ only there.

    check --output_dir (resume point) -> load and validate every sample -> load the model
    -> evaluate (skipped on resume when eval_before.json exists) -> train (checkpoints, preemption,
    evaluations during training) -> save (the best checkpoint's model with --load_best_model_at_end)
    -> reload (LoRA, ZeRO-3, best model) -> evaluate
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
from functools import partial
from pathlib import Path

import torch
import transformers
from accelerate import PartialState

from .args import RecipeArguments, gradient_accumulation_steps
from .console import available_cpus, setup_logging
from .data.samples import EvaluationSamples, TrainingSamples
from .data.validation import SKIPPED_SAMPLES
from .distributed import main_process_first, set_collective_timeout
from .errors import RecipeError
from .evaluation import evaluate, validation_loss
from .report import MetricsCallback, plot_report, step_records, update_metrics, write_run_args
from .task import Task, load_sources, validate_task_data
from .training.checkpoints import check_training_data, prepare_output_dir
from .training.failure import (
    EVALUATING_AFTER,
    EVALUATING_BEFORE,
    EXIT_DEADLINE_S,
    PREPARING,
    RunProgress,
    end_child_processes,
    exit_within,
    install_exit_handler,
    report_failure,
    reported_here,
)
from .training.loading import load_for_recipe, load_processor, load_trained_for_evaluation
from .training.preemption import StopRequest
from .training.preparation import prepare_for_training
from .training.selection import EvaluationDuringTraining, check_evaluation_during_training, use_best_checkpoint
from .training.trainer import setup_distributed, train_and_save

logger = logging.getLogger("phi3v")


def run_recipe(task: Task, args: RecipeArguments) -> dict[str, float | None]:
    """Run the recipe. Whatever fails ends it within seconds with one message and exit status 1
    (``phi3v.training.failure``): a problem the user must fix without a traceback, anything else with one."""
    state = setup_distributed(args)
    setup_logging(state.is_main_process)
    install_exit_handler()
    progress = RunProgress(args.output_dir)
    stop_request = StopRequest(announce=state.is_main_process)
    try:
        return _run(task, args, state, progress, stop_request)
    except Exception as error:
        stop_request.abandon()
        try:
            exit_within(EXIT_DEADLINE_S, 1)
            if reported_here(error, progress, state.is_main_process):
                report_failure(error, progress, args.output_dir, state.process_index)
        finally:
            stop_request.reported()
        end_child_processes()
        sys.exit(1)
    finally:
        state.destroy_process_group()  # a clean exit: gloo threads left running can abort the process


def _run(
    task: Task, args: RecipeArguments, state, progress: RunProgress, stop_request: StopRequest
) -> dict[str, float | None]:
    started = time.monotonic()
    accumulation = gradient_accumulation_steps(args.batch_size, state.num_processes, args.batch_size_per_gpu)
    logger.info(
        "World size %d, gradient accumulation %d, per-device batch %d",
        state.num_processes,
        accumulation,
        args.batch_size_per_gpu,
    )
    output_dir = Path(args.output_dir)
    metric = task.metric or args.metric
    if args.dataloader_num_workers > available_cpus():
        logger.info(
            "--dataloader_num_workers %d is more than the %d CPUs here: using %d.",
            args.dataloader_num_workers,
            available_cpus(),
            available_cpus(),
        )
        args.dataloader_num_workers = available_cpus()
    if args.eval_mode == "likelihood" and not task.classification:
        raise RecipeError("--eval_mode likelihood scores a fixed set of labels; this recipe's answers are free text.")
    check_evaluation_during_training(args, metric)
    resume_from = prepare_output_dir(args)
    if state.is_main_process:
        write_run_args(args, output_dir)
    processor = load_processor(args)
    train_set, eval_set, images_per_sample = _checked_datasets(task, args, processor, state, resume_from is not None)
    if resume_from is not None:
        check_training_data(resume_from, train_set.identity(), args.ignore_data_change)

    run_evaluation = partial(
        evaluate,
        processor=processor,
        dataset=eval_set,
        metric=metric,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.dataloader_num_workers,
        max_new_tokens=args.max_new_tokens,
        show_progress=not args.no_tqdm,
        mode=args.eval_mode,
        positive_label=task.auroc_label,
    )
    stop_request.install()
    model = load_for_recipe(args, quantize=args.use_qlora)
    set_collective_timeout(args.ddp_timeout)  # loaded: from now on no rank waits long for another
    progress.phase = EVALUATING_BEFORE
    before = _evaluate_before(run_evaluation, model, output_dir, metric, resume_from)
    if state.is_main_process:
        sizes = {"train_samples": len(train_set), "eval_samples": len(eval_set)}
        update_metrics(output_dir, metric=metric, before=before, auroc_before=_auroc(output_dir / "eval_before.json"))
        update_metrics(output_dir, **sizes)
    if stop_request.signal is not None:
        _stop_for_signal(stop_request, "before training started; nothing to resume, rerun the command")
    progress.phase = PREPARING
    transformers.set_seed(args.seed)  # LoRA's random initialisation, the same for the same --seed
    model = prepare_for_training(model, args)
    metrics = MetricsCallback(output_dir, images_per_sample, metric)
    model = train_and_save(
        model,
        processor,
        train_set,
        args,
        accumulation,
        resume_from,
        stop_request,
        train_set.source.where,
        metrics,
        progress,
        _evaluation_during_training(args, task, metric, run_evaluation, eval_set),
    )
    if model is None:
        checkpoint = output_dir / f"checkpoint-{stop_request.stopped_at_step}"
        _stop_for_signal(stop_request, f"{checkpoint} is complete; rerun the same command with "
                                       "--resume_from_checkpoint latest to continue")  # fmt: skip
    progress.phase = EVALUATING_AFTER
    best = use_best_checkpoint(output_dir) if args.load_best_model_at_end else None
    model_step = best["step"] if best is not None else metrics.last_step
    if args.use_lora or args.uses_zero3 or best is not None:  # free the training model first
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        model = load_trained_for_evaluation(args)
    after = run_evaluation(model, output_file=output_dir / "eval_after.json", details={"model_step": model_step})
    if state.is_main_process:
        final_loss = (step_records(metrics.log_history) or [{}])[-1].get("loss")
        after_report = {"after": after, "auroc_after": _auroc(output_dir / "eval_after.json"), "model_step": model_step}
        update_metrics(output_dir, **after_report)
        update_metrics(output_dir, final_loss=final_loss, total_runtime_s=time.monotonic() - started)
        logger.info("Run report: %s and %s", output_dir / "metrics.json", plot_report(output_dir))
    if state.is_main_process and metric != "none":
        logger.info("%s before training: %.4f, after training: %.4f", metric, before, after)
    state.wait_for_everyone()
    return {"before": before, "after": after}


def _checked_datasets(task: Task, args: RecipeArguments, processor, state, resumed: bool):
    """The task's splits, every sample validated (bad ones stop the run or are listed and dropped), as
    (training samples, evaluation samples, images per training sample)."""
    train, held_out = main_process_first(partial(load_sources, task, args))
    listing = Path(args.output_dir) / SKIPPED_SAMPLES if state.is_main_process else None
    checked = validate_task_data(task, args, processor, train, held_out, listing, resumed)
    train_set = TrainingSamples(
        train, checked.train_rows, task.train_conversation, processor, args.seed, checked.train_lengths
    )
    eval_set = EvaluationSamples(held_out, checked.eval_rows, task.eval_conversation, processor)
    logger.info("%d training samples, %d evaluation samples", len(train_set), len(eval_set))
    return train_set, eval_set, checked.train_images_per_sample


def _evaluation_during_training(
    args: RecipeArguments, task: Task, metric: str, run_evaluation, eval_set: EvaluationSamples
) -> EvaluationDuringTraining | None:
    """The evaluation during training: the one after training, on the first --eval_samples_during_training
    samples, without its progress bar (the training one is on screen); with --eval_loss, the same samples
    as training examples (prompt and answer) give the validation loss."""
    if not args.evaluates_during_training:
        return None
    samples = eval_set.head(args.eval_samples_during_training or len(eval_set))
    evaluate_samples = partial(run_evaluation, dataset=samples, show_progress=False)
    loss = None
    if args.eval_loss:
        answered = TrainingSamples(samples.source, samples.rows, task.train_conversation, samples.processor, args.seed)
        loss = partial(validation_loss, dataset=answered, pad_token_id=samples.processor.tokenizer.pad_token_id)
    return EvaluationDuringTraining(args, metric, evaluate_samples, len(samples), loss)


def _evaluate_before(run_evaluation, model, output_dir: Path, metric: str, resume_from: str | None) -> float | None:
    """The evaluation before training, or on resume the score already in eval_before.json."""
    done = output_dir / "eval_before.json"
    if resume_from is not None and done.is_file():
        score = json.loads(done.read_text())[metric]
        logger.info("Resuming: the evaluation before training is in %s (%s %s), not redone", done, metric, score)
        return score
    return run_evaluation(model, output_file=done)


def _auroc(evaluation_file: Path) -> float | None:
    return json.loads(evaluation_file.read_text()).get("auroc") if evaluation_file.is_file() else None


def _stop_for_signal(stop_request: StopRequest, what_now: str) -> None:
    if PartialState().is_main_process:
        logger.warning("Stopped by %s: %s.", stop_request.name, what_now)
    raise SystemExit(stop_request.exit_code)
