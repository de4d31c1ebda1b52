"""Runs that fail end within seconds, with one message naming what failed and how to resume, on one process
and on two ranks with dataloader workers: a disk that fills while a checkpoint is written, an image that
changes on disk during training, a rank that hangs; and a resume on other training data is refused.

Each run ends under a hard limit: a run that hangs fails its test instead of hanging the suite. Faults
that cannot happen for real here (a full disk at a chosen write, a hung rank) are injected through
``tests/recipes/faults/sitecustomize.py``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from phi3v.data.synthetic import write_custom, write_docvqa
from phi3v.training.checkpoints import incompleteness
from tests.conftest import REPO, flip_bytes, mounted_small_disk
from tests.recipes.conftest import kill_everything, launch, launch_failing, recipe_command, recipe_env, wait_until

DOCVQA = "finetune_hf_trainer_docvqa.py"
CUSTOM = "finetune_hf_trainer_custom.py"
FAULTS = Path(__file__).parent / "faults"
RUN_LIMIT_S = 300  # any run still going after this long has hung


@pytest.fixture(scope="module")
def docvqa(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("failures") / "docvqa"
    write_docvqa(folder, num_train=16, num_test=2)
    return folder


def lora_flags(tiny_dir: Path, data: list[str], output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(tiny_dir), *data, "--output_dir", str(output_dir), "--num_crops", "1",
        "--batch_size", "2", "--max_steps", "8", "--logging_steps", "1", "--warmup_steps", "0",
        "--learning_rate", "1e-3", "--max_eval_samples", "2", "--max_new_tokens", "2", "--no-tqdm",
        "--use_lora", "--lora_rank", "4", "--dataloader_num_workers", "2", *extra,
    ]  # fmt: skip


def custom_data(folder: Path, num_train: int) -> list[str]:
    write_custom(folder, num_train=num_train, num_eval=2)
    return ["--train_file", str(folder / "train.jsonl"), "--eval_file", str(folder / "eval.jsonl")]


def start(script: str, flags: list[str], ranks: int, log: Path, **faults: str) -> subprocess.Popen:
    env = recipe_env() | faults
    env["PYTHONPATH"] = f"{FAULTS}{os.pathsep}{env['PYTHONPATH']}"
    command = recipe_command(script, flags, ranks)
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for_exit(process: subprocess.Popen, log: Path) -> float:
    """The time the run ended; a run that has not ended within RUN_LIMIT_S is killed and the test fails."""
    try:
        process.wait(timeout=RUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        kill_everything(process)
        pytest.fail(f"the run hung: still running {RUN_LIMIT_S} s after it started:\n{log.read_text()[-3000:]}")
    return time.time()


def fault_time(fault_log: Path) -> float:
    return float(fault_log.read_text().split()[0])


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_disk_that_fills_while_a_checkpoint_is_written_ends_the_run_within_seconds(ranks, tiny_dir, docvqa, tmp_path):
    output_dir, log, fault_log = tmp_path / "out", tmp_path / "run.log", tmp_path / "fault.log"
    flags = lora_flags(tiny_dir, ["--dataset_name_or_path", str(docvqa)], output_dir, "--save_steps", "1")
    # rank 1 slow to say why it stops: torchrun's SIGTERM, sent when rank 0 exits, must not cut its line
    process = start(DOCVQA, flags, ranks, log, PHI3V_FAULT_DISK_FULL_AT_SAVE="3", PHI3V_FAULT_LOG=str(fault_log),
                    PHI3V_FAULT_SLOW_PEER_REPORT="2")  # fmt: skip
    exited = wait_for_exit(process, log)
    output = log.read_text()
    assert process.returncode != 0, output[-3000:]
    assert exited - fault_time(fault_log) < 60, output[-3000:]
    assert output.count("The run failed") == 1  # the failing rank says it once; the other says it stops
    assert f"The run failed while training, at optimizer step 3, writing {output_dir}/checkpoint-3:" in output
    assert "No space left on device" in output and f"The disk holding {output_dir} is full" in output
    assert f"The last complete checkpoint is {output_dir}/checkpoint-2. Continue from it with:" in output
    assert "--resume_from_checkpoint latest" in output and "finishing this step" not in output
    if ranks == 2:
        assert "Rank 1 stops: another process of the run died" in output
    assert incompleteness(output_dir / "checkpoint-3") is not None  # never taken by latest
    if ranks == 1:  # resume, with the newest complete checkpoint damaged since: the one before it is taken
        flip_bytes(output_dir / "checkpoint-2" / "adapter_model.safetensors")
        resumed = launch(DOCVQA, flags + ["--save_steps", "1", "--resume_from_checkpoint", "latest"])
        assert (f"Not resuming from {output_dir}/checkpoint-2: adapter_model.safetensors does not match the checksum"
                in resumed.stderr)  # fmt: skip
        assert f"Resuming from {output_dir}/checkpoint-1" in resumed.stderr
        assert (output_dir / "eval_after.json").exists()


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A real 16 MB disk."""
    with mounted_small_disk(tmp_path / "small_disk", "16m") as folder:
        yield folder


def test_a_real_disk_that_fills_up(small_disk, tiny_dir, docvqa, tmp_path):
    """No injected fault: checkpoints every step until the 16 MB disk is full (torch.save then fails with a bare
    "iostream error"). The run exits within 60 s of the failure naming the folder, and a copy of the folder
    resumes from its last complete checkpoint."""

    def flags(output_dir: Path) -> list[str]:
        data = ["--dataset_name_or_path", str(docvqa)]
        return lora_flags(tiny_dir, data, output_dir, "--lora_rank", "16", "--save_steps", "1", "--max_steps", "60")

    output_dir, log = small_disk / "out", tmp_path / "run.log"
    process = start(DOCVQA, flags(output_dir), 1, log)
    exited = wait_for_exit(process, log)
    output = log.read_text()
    failed = [line for line in output.splitlines() if "ERROR phi3v: The run failed" in line]
    assert process.returncode != 0 and failed, output[-3000:]
    failed_at = time.mktime(time.strptime(failed[0][:19], "%Y-%m-%d %H:%M:%S"))
    assert exited - failed_at < 60 and f"The disk holding {output_dir} is full" in output
    last = Path(re.search(r"The last complete checkpoint is (\S+)\. Continue", output).group(1))
    shutil.copytree(output_dir, tmp_path / "copy")
    step = int(last.name.split("-")[1])
    resumed = launch(
        DOCVQA, flags(tmp_path / "copy") + ["--resume_from_checkpoint", "latest", "--max_steps", str(step + 1)]
    )
    assert f"Resuming from {tmp_path / 'copy' / last.name}" in resumed.stderr


@pytest.mark.parametrize("ranks, skip", [(2, False), (1, True)], ids=["stops on two ranks", "skipped with the flag"])
def test_an_image_that_changes_on_disk_during_training(ranks, skip, tiny_dir, tmp_path):
    """All training images are truncated after the first step: the run stops naming a sample and its image,
    or with --skip_bad_samples trains on, counting and listing every skipped sample."""
    data, output_dir, log = tmp_path / "custom", tmp_path / "out", tmp_path / "run.log"
    flags = lora_flags(tiny_dir, custom_data(data, num_train=16), output_dir, "--max_steps", "12")
    process = start(CUSTOM, flags + (["--skip_bad_samples"] if skip else []), ranks, log)
    wait_until(lambda: "'loss'" in log.read_text(), process, log)
    images = list((data / "images").glob("*"))
    training = {i for line in (data / "train.jsonl").read_text().splitlines()
                for turn in json.loads(line)["conversations"] for i in turn["images"]}  # fmt: skip
    for image in images:
        if f"images/{image.name}" in training:
            image.write_bytes(image.read_bytes()[:300])
    truncated = time.time()
    exited = wait_for_exit(process, log)
    output = log.read_text()
    assert exited - truncated < 120, output[-3000:]
    if skip:
        assert process.returncode == 0, output[-3000:]
        skipped = [json.loads(line) for line in (output_dir / "skipped_samples.jsonl").read_text().splitlines()]
        assert skipped and all(entry["step"] > 1 for entry in skipped)
        assert all("changed on disk since" in entry["problems"][0] for entry in skipped)
        assert f"{len(skipped)} training sample(s) could not be read during training and were skipped" in output
    else:
        assert process.returncode != 0, output[-3000:]
        assert f"Training sample {data}/train.jsonl:" in output and f"cannot be read: image 1 ({data}/images/" in output
        assert "changed on disk since" in output and "--resume_from_checkpoint latest" in output


def test_a_rank_that_hangs_ends_the_run_after_ddp_timeout(tiny_dir, docvqa, tmp_path):
    """Rank 1 hangs while writing its part of checkpoint 2: rank 0 gives up after --ddp_timeout (not torch's
    30 minutes), says how to resume, and torchrun kills the hung rank 30 s after rank 0 exited."""
    output_dir, log, fault_log = tmp_path / "out", tmp_path / "run.log", tmp_path / "fault.log"
    flags = lora_flags(tiny_dir, ["--dataset_name_or_path", str(docvqa)], output_dir, "--save_steps", "1")
    faults = {"PHI3V_FAULT_HANG_WRITING": "checkpoint-2/rng_state_1.pth", "PHI3V_FAULT_LOG": str(fault_log)}
    process = start(DOCVQA, flags + ["--ddp_timeout", "10"], 2, log, **faults)
    exited = wait_for_exit(process, log)
    output = log.read_text()
    assert process.returncode != 0 and exited - fault_time(fault_log) < 10 + 30 + 30, output[-3000:]
    assert f"Rank 0: The run failed while training, at optimizer step 2, writing {output_dir}/checkpoint-2:" in output
    assert "another process of the run did not answer within --ddp_timeout" in output
    assert f"The last complete checkpoint is {output_dir}/checkpoint-1" in output


def test_resuming_on_changed_training_data_stops_unless_told_to_go_on(tiny_dir, tmp_path):
    data, output_dir = tmp_path / "custom", tmp_path / "out"
    flags = lora_flags(tiny_dir, custom_data(data, num_train=40), output_dir, "--max_steps", "2", "--save_steps", "2")
    launch(CUSTOM, flags)
    lines = (data / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("".join(line + "\n" for line in lines[:25]))  # the file was cut

    refused = launch_failing(CUSTOM, flags + ["--resume_from_checkpoint", "latest"])
    assert f"The training data changed since {output_dir}/checkpoint-2 was written: it was trained on 40 samples" in (
        refused.stderr
    )
    assert "the data now has 25" in refused.stderr and "--ignore_data_change" in refused.stderr
    assert "Trainer:" not in refused.stderr  # stopped before training
    resumed = launch(CUSTOM, flags + ["--resume_from_checkpoint", "latest", "--ignore_data_change"])
    assert "--ignore_data_change: The training data changed since" in resumed.stderr
