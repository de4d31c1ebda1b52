"""Checkpoints a run can trust: complete and verified or ignored, rotated, found again by --resume_from_checkpoint.

The HF Trainer writes ``checkpoint-N/`` (model or adapter, optimizer and scheduler or the DeepSpeed
engine state, every rank's RNG state, ``trainer_state.json``). Once every rank has written its part, each
rank syncs the files it wrote to disk and hashes them (xxh3-128; the rank named in a file's name wrote
it, rank 0 the rest), and rank 0 writes a marker last, ``checkpoint_complete.json``: every file with its
size and checksum, and the training data's fingerprint and sample count. A checkpoint counts only when
its marker is there and every file has its size; resuming also checks every checksum (each rank its own
files) and the training data, so a checkpoint interrupted while being written, truncated or corrupted
afterwards is never resumed from, nor one trained on other data without saying so.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import xxhash
from accelerate import PartialState
from transformers import TrainerCallback

from ..args import RecipeArguments
from ..data.validation import SKIPPED_SAMPLES
from ..distributed import barrier, decided_on_main, gathered
from ..errors import RecipeError, SharedError

logger = logging.getLogger(__name__)

MARKER = "checkpoint_complete.json"
CHECKSUM = "xxh3_128"  # a fast non-cryptographic hash: it finds damage, not tampering
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Files one rank writes: its RNG state (HF Trainer) and its DeepSpeed shards
RANK_FILE = re.compile(r"(?:^|[/_])(?:rng_state|zero_pp_rank)_(\d+)[._]")
BEST_CHECKPOINT = "best_checkpoint.json"  # the checkpoint of the best evaluation during training (--save_best)
EVALUATIONS = "evaluations"  # the answers of each evaluation during training, step-N.json
RUN_OUTPUTS = ("eval_before.json", "eval_after.json", SKIPPED_SAMPLES)
# What a run reports of itself: a fresh start in a folder where an earlier run died must not merge into it.
EARLIER_REPORTS = ("metrics.json", "training_report.png", BEST_CHECKPOINT)
HASH_CHUNK = 64 * 1024**2


def checkpoint_folders(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``checkpoint-N`` folders of ``output_dir``, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_NAME.match(p.name))]
    return sorted(found)


# --- writing the marker -------------------------------------------------------------------------------------


def file_owner(name: str, world_size: int) -> int:
    """The rank that hashes a checkpoint file, and verifies it on resume: the one its name says wrote it
    (``rng_state_3.pth``, ``zero_pp_rank_3_...``), rank 0 for the rest and for ranks this run lacks."""
    match = RANK_FILE.search(name)
    rank = int(match.group(1)) if match else 0
    return rank if rank < world_size else 0


def file_checksum(path: Path) -> str:
    """xxh3-128 of the file's bytes, read through a memory map (no copy: the page cache is hashed in place)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:  # an empty file cannot be mapped
            return digest.hexdigest()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
            for start in range(0, len(view), HASH_CHUNK):
                digest.update(view[start : start + HASH_CHUNK])
    return digest.hexdigest()


def _files(checkpoint: Path) -> list[Path]:
    return sorted(p for p in checkpoint.rglob("*") if p.is_file() and not p.name.startswith(MARKER))


def own_file_entries(checkpoint: Path, rank: int = 0, world_size: int = 1) -> dict[str, dict[str, Any]]:
    """Size and checksum of the files of ``checkpoint`` that ``rank`` owns, each synced to disk first."""
    entries = {}
    for path in _files(checkpoint):
        name = path.relative_to(checkpoint).as_posix()
        if file_owner(name, world_size) != rank:
            continue
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        entries[name] = {"size": path.stat().st_size, CHECKSUM: file_checksum(path)}
    return entries


def write_marker(checkpoint: Path, files: dict[str, dict[str, Any]], training_data: dict | None) -> None:
    """The marker, written atomically and synced: the checkpoint is complete from here on."""
    partial = checkpoint / f"{MARKER}.partial"
    with open(partial, "w") as handle:
        json.dump({"files": dict(sorted(files.items())), "training_data": training_data}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(checkpoint / MARKER)
    _fsync_folder(checkpoint)


def mark_complete(checkpoint: Path, training_data: dict | None = None) -> None:
    """One process: hash every file of ``checkpoint``, then write the marker."""
    write_marker(checkpoint, own_file_entries(checkpoint), training_data)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --- reading it back ----------------------------------------------------------------------------------------


def read_marker(checkpoint: Path) -> dict[str, Any]:
    """The marker, each file's entry as ``{"size", "xxh3_128"}`` (markers written before checksums existed
    list sizes only); raises FileNotFoundError, OSError or ValueError when it is missing or unreadable."""
    marker = json.loads((checkpoint / MARKER).read_text())
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict):
        raise ValueError("no file list")
    marker["files"] = {name: {"size": entry} if isinstance(entry, int) else entry for name, entry in files.items()}
    if not all(isinstance(entry, dict) and isinstance(entry.get("size"), int) for entry in marker["files"].values()):
        raise ValueError("a file without its size")
    return marker


def incompleteness(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` is not complete (no marker, a file missing or of another size), or None.

    Only sizes: cheap enough for every rotation; resuming also checks the checksums (``corruption``)."""
    try:
        files = read_marker(checkpoint)["files"]
    except FileNotFoundError:
        return "no completion marker: it was interrupted while being written"
    except (OSError, ValueError) as error:
        return f"unreadable completion marker ({error})"
    for name, entry in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} is {path.stat().st_size} bytes, {entry['size']} when it was written (truncated or replaced)"
    return None


def corruption(
    checkpoint: Path, rank: int = 0, world_size: int = 1, names: Callable[[str], bool] | None = None
) -> str | None:
    """The first file of those ``rank`` verifies (and ``names`` accepts) whose content no longer has its recorded
    checksum, or None."""
    try:
        files = read_marker(checkpoint)["files"]
    except (OSError, ValueError) as error:
        return f"unreadable completion marker ({error})"
    for name, entry in files.items():
        expected = entry.get(CHECKSUM)
        if expected is None or file_owner(name, world_size) != rank or (names is not None and not names(name)):
            continue
        try:
            matches = file_checksum(checkpoint / name) == expected
        except OSError as error:
            return f"{name} cannot be read ({error})"
        if not matches:
            return f"{name} does not match the checksum recorded when it was written (corrupted since)"
    return None


def newest_complete(output_dir: str | Path) -> Path | None:
    """The newest checkpoint with its marker and every file of its size (checksums not read)."""
    complete = (folder for _, folder in reversed(checkpoint_folders(output_dir)) if incompleteness(folder) is None)
    return next(complete, None)


def best_checkpoint(output_dir: str | Path) -> dict[str, Any] | None:
    """The record of the best checkpoint (``{"step", "metric", "score", "checkpoint"}``), or None."""
    path = Path(output_dir) / BEST_CHECKPOINT
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def rotate_checkpoints(output_dir: str | Path, keep: int | None) -> None:
    """Keep the ``keep`` newest complete checkpoints and the best one; drop older ones and incomplete leftovers
    below them."""
    folders = checkpoint_folders(output_dir)
    complete = [step for step, folder in folders if incompleteness(folder) is None]
    if not complete:
        return
    kept = set(complete[-keep:]) if keep else set(complete)
    best = best_checkpoint(output_dir)
    if best is not None:
        kept.add(best["step"])
    for step, folder in folders:
        if step not in kept and (step in complete or step < complete[-1]):
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("Removed %s (--save_total_limit %s)", folder, keep)


class CheckpointCallback(TrainerCallback):
    """After the Trainer saved a checkpoint on every rank: each rank hashes its files, rank 0 writes the
    marker (with ``training_data``, the data's fingerprint and sample count), then rotates."""

    def __init__(self, save_total_limit: int | None, training_data: dict | None = None):
        self.save_total_limit = save_total_limit
        self.training_data = training_data

    def on_save(self, args, state, control, **kwargs):
        barrier()  # every rank has written its part (DeepSpeed shards, its RNG state)
        world = PartialState()
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        started = time.monotonic()
        mine = own_file_entries(checkpoint, world.process_index, world.num_processes)
        per_rank = gathered([(mine, time.monotonic() - started)])
        if state.is_world_process_zero:
            files = {name: entry for entries, _ in per_rank for name, entry in entries.items()}
            write_marker(checkpoint, files, self.training_data)
            megabytes = sum(entry["size"] for entry in files.values()) / 1e6
            slowest = max(seconds for _, seconds in per_rank)
            logger.info("Checkpoint %s is complete: %d files, %.1f MB, checksums in %.2f s (the slowest rank)",
                        checkpoint, len(files), megabytes, slowest)  # fmt: skip
            rotate_checkpoints(args.output_dir, self.save_total_limit)
        barrier()
        return control


# --- the output folder, before anything loads --------------------------------------------------------------


def prepare_output_dir(args: RecipeArguments) -> str | None:
    """Check --output_dir and return the checkpoint to resume from (None for a fresh start).

    Refuses a folder that cannot be written, or that holds a finished run or checkpoints, unless the
    run resumes or --overwrite_output_dir clears them. Decided on the main process, the same on every rank;
    the checksums of a checkpoint to resume from are checked by every rank, each its own files.
    """
    outcome = decided_on_main(partial(_decide, args))
    if isinstance(outcome, list):
        outcome = _verified_resume_point(outcome, Path(args.output_dir), args.resume_from_checkpoint != "latest")
    if outcome is None and PartialState().is_main_process:
        _forget_earlier_reports(Path(args.output_dir))
    barrier()  # the main process may have removed old checkpoints
    return outcome


def _forget_earlier_reports(output_dir: Path) -> None:
    for name in EARLIER_REPORTS:
        (output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(output_dir / EVALUATIONS, ignore_errors=True)


def _decide(args: RecipeArguments) -> list[str] | None:
    """None (a fresh start) or the checkpoints to resume from, best first; raises when the run may not start."""
    output_dir = Path(args.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        message = f"--output_dir {output_dir} cannot be written ({error}). Pick a folder you can write to."
        raise RecipeError(message) from None
    if args.resume_from_checkpoint is not None:
        return _resume_candidates(args, output_dir)
    finished = (output_dir / "eval_after.json").exists()
    checkpoints = checkpoint_folders(output_dir)
    if (finished or checkpoints) and not args.overwrite_output_dir:
        what = "a finished run (eval_after.json)" if finished else f"checkpoints ({checkpoints[-1][1].name} ...)"
        raise RecipeError(
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


def _resume_candidates(args: RecipeArguments, output_dir: Path) -> list[str] | None:
    if args.resume_from_checkpoint != "latest":
        checkpoint = Path(args.resume_from_checkpoint)
        problem = incompleteness(checkpoint) if checkpoint.is_dir() else "no such folder"
        if problem is not None:
            raise RecipeError(f"--resume_from_checkpoint {checkpoint}: {problem}. Pass another checkpoint or 'latest'.")
        return [str(checkpoint)]
    candidates = []
    for _, folder in reversed(checkpoint_folders(output_dir)):
        problem = incompleteness(folder)
        if problem is None:
            candidates.append(str(folder))
        else:
            logger.warning("Not resuming from %s: %s.", folder, problem)
    if not candidates:
        logger.info("--resume_from_checkpoint latest: no complete checkpoint in %s yet, starting afresh", output_dir)
        return None
    return candidates


def _verified_resume_point(candidates: list[str], output_dir: Path, explicit: bool) -> str | None:
    """The first of ``candidates`` whose files all have their checksums, checked by every rank in parallel."""
    state = PartialState()
    for candidate in candidates:
        started = time.monotonic()
        mine = corruption(Path(candidate), state.process_index, state.num_processes)
        problems = [problem for problem in gathered([mine]) if problem]
        if not problems:
            if state.is_main_process:
                logger.info("Checksums of %s verified in %.2f s", candidate, time.monotonic() - started)
                _drop_later_checkpoints(Path(candidate), output_dir)
            return candidate
        if explicit:
            raise SharedError(f"--resume_from_checkpoint {candidate}: {problems[0]}. Pass another checkpoint or "
                              "'latest'.")  # fmt: skip
        if state.is_main_process:
            logger.warning("Not resuming from %s: %s.", candidate, problems[0])
    if state.is_main_process:
        logger.warning("--resume_from_checkpoint latest: no intact checkpoint in %s, starting afresh", output_dir)
    return None


def _drop_later_checkpoints(checkpoint: Path, output_dir: Path) -> None:
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


# --- the training data a checkpoint was trained on -------------------------------------------------------------


def check_training_data(checkpoint: str, current: dict, ignore_change: bool) -> None:
    """Stop (or, with ``ignore_change``, warn) when ``checkpoint`` was trained on other data than ``current``
    (``{"fingerprint", "samples", "origin"}``). Decided on the main process, the same on every rank."""
    problem = decided_on_main(partial(_data_change, Path(checkpoint), current))
    if problem is None:
        return
    if not ignore_change:
        raise SharedError(
            f"{problem} Resuming would continue at the checkpoint's position in other samples. Restore the data, "
            "start a new run (another --output_dir, or --overwrite_output_dir), or pass --ignore_data_change to "
            "resume anyway."
        )
    if PartialState().is_main_process:
        logger.warning("--ignore_data_change: %s Resuming anyway.", problem)


def _data_change(checkpoint: Path, current: dict) -> str | None:
    recorded = read_marker(checkpoint).get("training_data")
    if recorded is None:
        logger.info("%s records no training data (written by an older version): the data is not checked.", checkpoint)
        return None
    if recorded["fingerprint"] == current["fingerprint"]:
        return None
    other = " with other content" if recorded["samples"] == current["samples"] else ""
    return (
        f"The training data changed since {checkpoint} was written: it was trained on {recorded['samples']} samples "
        f"of {recorded['origin']} (fingerprint {recorded['fingerprint'][:12]}), the data now has {current['samples']}"
        f"{other} (fingerprint {current['fingerprint'][:12]}; it covers the data files' names and sizes, a "
        "conversation file's text, and the samples kept)."
    )
