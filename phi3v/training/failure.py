"""A run that fails ends within seconds, with one message that says what happened and how to go on.

Whatever goes wrong while loading, training, saving or evaluating:
- the process that hit the error logs it once: the error, the optimizer step, the checkpoint being
  written, the sample or file when known, and the command that resumes from the last complete checkpoint.
  A process whose collective failed because another one died or hung says only that, in one line (rank 0
  also how to resume); a problem every rank finds alike is told by the main process alone;
- its dataloader workers are killed, not waited for (they ignore stop signals, see ``phi3v.training.preemption``,
  and multiprocessing would otherwise wait for them forever at exit);
- a stop signal arriving now ends the process at once instead of promising a checkpoint;
- the process exits with status 1, within ``EXIT_DEADLINE_S`` seconds even when cleanup hangs.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import traceback
from pathlib import Path

from transformers import TrainerCallback

from ..errors import RecipeError, SharedError, no_space_left, user_error_message
from .checkpoints import newest_complete

logger = logging.getLogger("phi3v")

EXIT_DEADLINE_S = 20  # after the message: cleanup that takes longer is cut short
BOOLEAN_VALUES = ("true", "false", "yes", "no", "1", "0", "t", "f", "y", "n")  # what a flag like --x true takes
NEARLY_FULL_BYTES = 64 * 1024**2  # less free space than this after a failed write: the disk filled up
WORKER_TRACEBACK = "Original Traceback (most recent call last):"
# What a collective raises when another process died (gloo, NCCL) or did not answer in time.
PEER_GONE = re.compile(r"Connection (closed|reset) by peer|remote worker crashing|Broken pipe|communicator was abort")
PEER_TIMEOUT = re.compile(r"Timed out waiting|Watchdog caught collective operation timeout")
COLLECTIVE_BACKEND = re.compile(r"gloo|NCCL|c10d|ProcessGroup")

# The phases of a run, as the message names them
LOADING = "loading"
PREPARING = "preparing the model for training"
EVALUATING_BEFORE = "evaluating before training"
TRAINING = "training"
SAVING = "saving the trained model"
EVALUATING_AFTER = "evaluating after training"
# Phases whose problems every rank finds alike (flags, data, output folder, what trains): told once.
COLLECTIVE_PHASES = (LOADING, PREPARING)


class RunProgress(TrainerCallback):
    """Where the run is, for the message if it fails: the phase, the optimizer step, the checkpoint being
    written, whether the trained model is saved.

    It must be the last callback: the ones before it may ask for a checkpoint in ``on_step_end``."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.phase = LOADING
        self.step: int | None = None  # the optimizer step being computed
        self.writing: Path | None = None  # the checkpoint being written
        self.model_saved = False  # the trained model is in output_dir

    def on_train_begin(self, args, state, control, **kwargs):
        self.phase = TRAINING
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step
        if control.should_save:
            self.writing = self.output_dir / f"checkpoint-{state.global_step}"
        return control

    def on_save(self, args, state, control, **kwargs):
        self.writing = None
        return control

    @property
    def collective(self) -> bool:
        return self.phase in COLLECTIVE_PHASES


def reported_here(error: BaseException, progress: RunProgress, is_main_process: bool) -> bool:
    """Whether this process reports ``error``: a problem every rank has alike only on the main process."""
    shared = isinstance(error, SharedError) or (isinstance(error, RecipeError) and progress.collective)
    return is_main_process or not shared


def failure_message(error: BaseException, progress: RunProgress, checkpoint: Path | None) -> str:
    """What failed, where, and what to do; ``checkpoint`` is the newest complete one (None: there is none)."""
    where = [f"while {progress.phase}"]
    if progress.step is not None and progress.phase == TRAINING:
        where.append(f"at optimizer step {progress.step}")
    if progress.writing is not None:
        where.append(f"writing {progress.writing}")
    peer = peer_problem(error)
    if peer is None:
        what = error_text(error)
    else:
        what = f"{peer} (its own error, if it could report one, is in its log): {_short(error)}"
    lines = [f"The run failed {', '.join(where)}:", f"  {what}"]
    if disk_full(error, progress):
        lines.append(f"The disk holding {progress.output_dir} is full: free space (df -h {progress.output_dir}) or "
                     "use another --output_dir.")  # fmt: skip
    if progress.collective:
        lines.append("Rerun the command once this is fixed.")
    elif progress.model_saved:
        lines.append(f"The trained model is saved in {progress.output_dir}, but not evaluated. A rerun would train "
                     "it again" + (f" from {checkpoint}" if checkpoint else " from the start") + " and replace it: "
                     "copy it elsewhere first.")  # fmt: skip
    elif checkpoint is not None:
        lines.append(f"The last complete checkpoint is {checkpoint}. Continue from it with:")
        lines.append(f"  {resume_command()}")
    else:
        lines.append(
            "No complete checkpoint was written (--save_steps N writes them), so a rerun starts over:"
            f"\n  {resume_command()}"
        )
    return "\n".join(lines)


def error_text(error: BaseException) -> str:
    """The error as one reads it: a dataloader worker's error without PyTorch's wrapping around it."""
    text = str(error)
    if WORKER_TRACEBACK in text:
        last_line = text.rstrip().splitlines()[-1]
        start = text.rfind(f"{type(error).__module__}.{type(error).__qualname__}: ")
        if isinstance(error, RecipeError) and start >= 0:
            return text[start:].split(": ", 1)[1].strip()
        return f"{type(error).__name__} in a dataloader worker: {last_line}"
    return text if isinstance(error, RecipeError) else f"{type(error).__name__}: {text}"


def disk_full(error: BaseException, progress: RunProgress) -> bool:
    """The error is, or while writing looks like, a full disk (torch.save then only says "iostream error")."""
    if no_space_left(error):
        return True
    writing = progress.writing is not None or progress.phase.startswith(SAVING)
    try:
        return writing and shutil.disk_usage(progress.output_dir).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def peer_problem(error: BaseException) -> str | None:
    """Why a collective failed when the cause is another process (gone, or not answering), else None."""
    text = str(error)
    from_collective = COLLECTIVE_BACKEND.search(text) or type(error).__name__.startswith("Dist")
    if _world_size() < 2 or not from_collective:
        return None
    if PEER_GONE.search(text):
        return "another process of the run died"
    if PEER_TIMEOUT.search(text):
        return "another process of the run did not answer within --ddp_timeout"
    return None


def resume_command(argv: list[str] | None = None) -> str:
    """The command line of this run, resuming from the newest complete checkpoint (never overwriting it)."""
    argv = list(sys.argv if argv is None else argv)
    flags, dropping = [], None
    for item in argv[1:]:
        if dropping is not None and not item.startswith("--"):
            if dropping == "--resume_from_checkpoint" or item.lower() in BOOLEAN_VALUES:
                dropping = None
                continue
        dropping = None
        name = item.split("=", 1)[0]
        if name in ("--resume_from_checkpoint", "--overwrite_output_dir"):
            dropping = name if "=" not in item else None
        else:
            flags.append(item)
    command = [argv[0], *flags, "--resume_from_checkpoint", "latest"]
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return shlex.join(["python", *command])
    local, world = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), _world_size()
    nodes = f"--nnodes={world // local} [your rendezvous options] " if world > local else ""
    return f"torchrun {nodes}--nproc_per_node={local} {shlex.join(command)}"


def report_failure(error: BaseException, progress: RunProgress, output_dir: str | Path, rank: int) -> None:
    """Log the failure once. A problem the user must fix before training starts (flags, data, folders): one
    ``error: ...`` message, as every program prints it. A collective that failed because of another process:
    one line, except on rank 0, which also says how to resume (the other may have died without a word: killed
    for memory, say). An expected problem (data, disk) without a traceback. Whatever goes wrong here, the
    error is logged."""
    try:
        peer = peer_problem(error)
        if peer is None and isinstance(error, RecipeError) and progress.collective:
            print(user_error_message(error), file=sys.stderr)  # before training: nothing to resume
            return
        if peer is not None and rank != 0:
            logger.error("Rank %d stops: %s: %s", rank, peer, _short(error))
            return
        if peer is None and not isinstance(error, (RecipeError, OSError)) and not disk_full(error, progress):
            # not a problem of the data, flags or disk: the traceback is what a bug report needs
            logger.error("Rank %d failed:\n%s", rank, "".join(traceback.format_exception(error)).rstrip())
        prefix = f"Rank {rank}: " if _world_size() > 1 else ""
        logger.error("%s%s", prefix, failure_message(error, progress, newest_complete(output_dir)))
    except Exception as reporting_error:  # never let the report hide the error itself
        logger.error("Rank %d failed (and describing it failed too: %r):\n%s", rank, reporting_error,
                     "".join(traceback.format_exception(error)).rstrip())  # fmt: skip


def _short(error: BaseException) -> str:
    return re.sub(r"^\[[^\]]*\]\s*", "", str(error)).split(". ")[0]  # without gloo's source location


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def end_child_processes() -> None:
    """Kill this process's dataloader workers (and any other daemonic child) now.

    They ignore SIGTERM and SIGINT, so multiprocessing's exit handler, which sends SIGTERM and then waits,
    would wait forever for a worker whose loader was never shut down (the loader of a failed step)."""
    if threading.current_thread() is threading.main_thread():
        # PyTorch's SIGCHLD handler raises in the main thread when it sees a worker of a live loader die
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = [child for child in multiprocessing.active_children() if child.daemon]
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)


def install_exit_handler() -> None:
    """End dataloader workers at every exit, before multiprocessing's handler (registered earlier, so run later)
    would wait for them."""
    atexit.register(end_child_processes)


def exit_within(seconds: float, code: int) -> None:
    """Exit with ``code`` after ``seconds`` whatever the main thread is doing (a collective, a join, a flush)."""

    def force_exit() -> None:
        os.write(2, f"Cleanup after the failure took over {seconds:.0f} s: exiting now.\n".encode())
        os._exit(code)

    timer = threading.Timer(seconds, force_exit)
    timer.daemon = True
    timer.start()
