"""How a failing run ends: its message (the error as one reads it, the resume command, a peer's failure told
apart) and dataloader workers that cannot keep the process from exiting."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from phi3v.errors import RecipeError
from phi3v.training.failure import RunProgress, error_text, failure_message, peer_problem, resume_command
from tests.conftest import REPO


class Failing(torch.utils.data.Dataset):
    def __init__(self, error: Exception):
        self.error = error

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        raise self.error


def error_from_a_worker(error: Exception) -> Exception:
    with pytest.raises(type(error)) as caught:
        next(iter(torch.utils.data.DataLoader(Failing(error), num_workers=1)))
    return caught.value


def test_an_error_in_a_dataloader_worker_reads_as_the_original_message():
    message = "Evaluation sample data.jsonl:7: image 1 (a.jpg): corrupt or truncated image data.\n  Restore it."
    wrapped = error_from_a_worker(RecipeError(message))
    assert "Original Traceback" in str(wrapped)  # what PyTorch hands over
    assert error_text(wrapped) == message
    assert error_text(error_from_a_worker(ValueError("boom"))) == "ValueError in a dataloader worker: ValueError: boom"


def test_the_resume_command_resumes_and_never_overwrites(monkeypatch):
    argv = ["finetune_hf_trainer_docvqa.py", "--use_lora", "--overwrite_output_dir", "true", "--resume_from_checkpoint",
            "runs/x/checkpoint-4", "--output_dir", "runs/x", "--resume_from_checkpoint=latest"]  # fmt: skip
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    expected = "finetune_hf_trainer_docvqa.py --use_lora --output_dir runs/x --resume_from_checkpoint latest"
    assert resume_command(argv) == f"python {expected}"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert resume_command(argv) == f"torchrun --nnodes=2 [your rendezvous options] --nproc_per_node=8 {expected}"


def test_the_message_names_the_step_the_checkpoint_being_written_and_the_one_to_resume_from(tmp_path):
    progress = RunProgress(tmp_path)
    progress.phase, progress.step, progress.writing = "training", 12, tmp_path / "checkpoint-12"
    error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoint-12" / "optimizer.pt"))
    message = failure_message(error, progress, tmp_path / "checkpoint-8")
    assert message.startswith(f"The run failed while training, at optimizer step 12, writing {tmp_path}/checkpoint-12:")
    assert f"The disk holding {tmp_path} is full" in message
    assert f"The last complete checkpoint is {tmp_path}/checkpoint-8" in message
    assert message.rstrip().endswith("--resume_from_checkpoint latest")
    progress.writing, progress.phase, progress.model_saved = None, "evaluating after training", True
    message = failure_message(RecipeError("Evaluation sample x:3: image 1: truncated"), progress, None)
    assert "The trained model is saved in" in message and "train it again from the start and replace it" in message
    progress.phase = "loading"
    assert failure_message(RecipeError("--output_dir is a file"), progress, None).endswith(
        "Rerun the command once this is fixed."
    )


def test_a_collective_that_failed_because_of_another_process_is_told_apart(monkeypatch):
    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:4321. This is ...")
    stuck = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 600000ms for recv operation")
    download = ConnectionResetError("Connection reset by peer")  # not a collective: the process's own problem
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert peer_problem(gone) == "another process of the run died"
    assert peer_problem(stuck) == "another process of the run did not answer within --ddp_timeout"
    assert peer_problem(download) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert peer_problem(gone) is None


WORKERS_LEFT_RUNNING = textwrap.dedent(
    """
    import sys, torch
    from functools import partial
    from phi3v.training.failure import install_exit_handler
    from phi3v.data.collators import start_dataloader_worker

    install_exit_handler()
    worker_init = partial(start_dataloader_worker, None)
    loader = torch.utils.data.DataLoader(range(100), num_workers=2, worker_init_fn=worker_init)
    batches = iter(loader)
    next(batches)  # workers running, and the iterator still referenced when the error ends the program
    raise RuntimeError("the step failed")
    """
)


def test_dataloader_workers_that_ignore_stop_signals_do_not_keep_a_failed_process_alive():
    """Without the exit handler this program never ends: multiprocessing's exit handler sends the workers
    SIGTERM, which they ignore, and waits for them."""
    command = [sys.executable, "-c", WORKERS_LEFT_RUNNING]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the process did not exit within 60 s of its error: its dataloader workers kept it alive")
    assert process.returncode == 1 and "the step failed" in stderr


def test_cleanup_that_hangs_after_a_failure_is_cut_short():
    script = "import time\nfrom phi3v.training.failure import exit_within\nexit_within(1, 3)\ntime.sleep(60)\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=50)
    assert result.returncode == 3 and "Cleanup after the failure took over 1 s: exiting now" in result.stderr


@pytest.mark.parametrize("when", ["while the message is written", "after it"])
def test_a_stop_signal_after_the_run_failed_waits_for_its_message_then_ends_the_process_at_once(when):
    """torchrun sends SIGTERM to the other ranks the moment one exits: a rank writing why it stops finishes the
    line, then the signal ends the process at once, as one that comes during the cleanup does."""
    during = when == "while the message is written"
    script = textwrap.dedent(
        f"""
        import os, signal, time
        from phi3v.training.preemption import StopRequest

        request = StopRequest().install()
        request.abandon()  # the run failed and is writing its message
        if {during}:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        print("the message", flush=True)
        request.reported()  # cleaning up
        if not {during}:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        print("not reached", flush=True)
        """
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == -15 and "the message" in result.stdout and "not reached" not in result.stdout
    assert time.monotonic() - started < 9  # not the sleep's end
    assert "SIGTERM received while the run stops after an error: exiting now" in result.stderr
    assert "finishing this step" not in result.stderr
