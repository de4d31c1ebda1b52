"""Checkpoints a run can trust: complete or ignored, rotated, and found again by --resume_from_checkpoint.

The HF Trainer writes ``checkpoint-N/`` (model or adapter, optimizer and scheduler or the DeepSpeed
engine state, every rank's RNG state, ``trainer_state.json``). Once every rank has finished and the
files are synced to disk, a marker, ``checkpoint_complete.json``, is written last and lists the files
with their sizes. A checkpoint counts only when its marker is there and every listed file has that size,
so one interrupted while being written, or damaged afterwards, is never resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from accelerate import PartialState
from transformers import TrainerCallback

from .args import RecipeArguments
from .distributed import barrier, from_main_process
from .errors import RecipeError

logger = logging.getLogger(__name__)

MARKER = "checkpoint_complete.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
RUN_OUTPUTS = ("eval_before.json", "eval_after.json", "skipped_samples.jsonl")


def checkpoint_folders(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``checkpoint-N`` folders of ``output_dir``, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_NAME.match(p.name))]
    return sorted(found)


def incompleteness(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, or None when it is complete."""
    try:
        files = json.loads((checkpoint / MARKER).read_text())["files"]
    except FileNotFoundError:
        return "no completion marker: it was interrupted while being written"
    except (OSError, ValueError, KeyError) as error:
        return f"unreadable completion marker ({error})"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} when it was written (truncated or replaced)"
    return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint; incomplete newer ones are skipped with a warning."""
    for _, folder in reversed(checkpoint_folders(output_dir)):
        problem = incompleteness(folder)
        if problem is None:
            return folder
        logger.warning("Not resuming from %s: %s.", folder, problem)
    return None


def mark_complete(checkpoint: Path) -> None:
    """Sync every file of ``checkpoint`` to disk, then write the marker (atomically) listing them."""
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MARKER):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        files[path.relative_to(checkpoint).as_posix()] = path.stat().st_size
    partial = checkpoint / f"{MARKER}.partial"
    with open(partial, "w") as handle:
        json.dump({"files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(checkpoint / MARKER)
    _fsync_folder(checkpoint)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def rotate_checkpoints(output_dir: str | Path, keep: int | None) -> None:
    """Keep the ``keep`` newest complete checkpoints; drop older ones and incomplete leftovers below them."""
    folders = checkpoint_folders(output_dir)
    complete = [step for step, folder in folders if incompleteness(folder) is None]
    if not complete:
        return
    kept = set(complete[-keep:]) if keep else set(complete)
    for step, folder in folders:
        if step not in kept and (step in complete or step < complete[-1]):
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("Removed %s (--save_total_limit %s)", folder, keep)


class CheckpointCallback(TrainerCallback):
    """After the Trainer saved a checkpoint on every rank: mark it complete, then rotate."""

    def __init__(self, save_total_limit: int | None):
        self.save_total_limit = save_total_limit

    def on_save(self, args, state, control, **kwargs):
        barrier()  # every rank has written its part (DeepSpeed shards, its RNG state)
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            mark_complete(checkpoint)
            logger.info("Checkpoint %s is complete", checkpoint)
            rotate_checkpoints(args.output_dir, self.save_total_limit)
        barrier()
        return control


# --- the output folder, before anything loads --------------------------------------------------------------


def prepare_output_dir(args: RecipeArguments) -> str | None:
    """Check --output_dir and return the checkpoint to resume from (None for a fresh start).

    Refuses a folder that cannot be written, or that holds a finished run or checkpoints, unless the
    run resumes or --overwrite_output_dir clears them. Decided on the main process, the same on every rank.
    """
    outcome = from_main_process(_decide(args) if PartialState().is_main_process else None)
    if isinstance(outcome, RecipeError):
        raise outcome
    barrier()  # the main process may have removed old checkpoints
    return outcome


def _decide(args: RecipeArguments) -> str | RecipeError | None:
    output_dir = Path(args.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        return RecipeError(f"--output_dir {output_dir} cannot be written ({error}). Pick a folder you can write to.")
    if args.resume_from_checkpoint is not None:
        return _resume_point(args, output_dir)
    finished = (output_dir / "eval_after.json").exists()
    checkpoints = checkpoint_folders(output_dir)
    if (finished or checkpoints) and not args.overwrite_output_dir:
        what = "a finished run (eval_after.json)" if finished else f"checkpoints ({checkpoints[-1][1].name} ...)"
        return RecipeError(
            f"--output_dir {output_dir} already holds {what}. Resume it with --resume_from_checkpoint latest, "
            "pass --overwrite_output_dir to start over (its checkpoints and results are deleted), or pick "
            "another --output_dir."
        )
    if args.overwrite_output_dir:
        for _, folder in checkpoints:
            shutil.rmtree(folder)
        for name in RUN_OUTPUTS:
            (output_dir / name).unlink(missing_ok=True)
        if checkpoints or finished:
            logger.warning(
                "--overwrite_output_dir: removed the earlier run's checkpoints and results in %s", output_dir
            )
    return None


def _resume_point(args: RecipeArguments, output_dir: Path) -> str | RecipeError | None:
    if args.resume_from_checkpoint == "latest":
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            logger.info(
                "--resume_from_checkpoint latest: no complete checkpoint in %s yet, starting afresh", output_dir
            )
            return None
    else:
        checkpoint = Path(args.resume_from_checkpoint)
        problem = incompleteness(checkpoint) if checkpoint.is_dir() else "no such folder"
        if problem is not None:
            return RecipeError(
                f"--resume_from_checkpoint {checkpoint}: {problem}. Pass another checkpoint or 'latest'."
            )
    step = int(CHECKPOINT_NAME.match(checkpoint.name).group(1)) if CHECKPOINT_NAME.match(checkpoint.name) else None
    if step is not None and checkpoint.parent.resolve() == output_dir.resolve():
        for later, folder in checkpoint_folders(output_dir):
            if later > step:  # an abandoned future: it would be rewritten step by step, stale files and all
                shutil.rmtree(folder)
                logger.warning("Removed %s: the run resumes from the earlier %s", folder, checkpoint.name)
    ranks = len(list(checkpoint.glob("rng_state_*.pth"))) or 1  # one RNG file per rank that wrote it
    if ranks != PartialState().num_processes:
        logger.warning(
            "%s was written by %d process(es), this run has %d: training continues, but the data order per rank "
            "and the random state differ from an uninterrupted run (and DeepSpeed may refuse the optimizer state).",
            checkpoint,
            ranks,
            PartialState().num_processes,
        )
    logger.info("Resuming from %s", checkpoint)
    return str(checkpoint)
