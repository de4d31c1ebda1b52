"""Checkpoint completeness, `latest`, rotation, and the --output_dir checks made before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phi3v.args import RecipeArguments, parse_args
from phi3v.checkpoints import (
    MARKER,
    incompleteness,
    latest_checkpoint,
    mark_complete,
    prepare_output_dir,
    rotate_checkpoints,
)
from phi3v.errors import RecipeError


def write_checkpoint(output_dir: Path, step: int, complete: bool = True) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    (folder / "global_step1").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"w" * 100)
    (folder / "optimizer.pt").write_bytes(b"o" * 50)
    (folder / "global_step1" / "shard.pt").write_bytes(b"s" * 10)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        mark_complete(folder)
    return folder


def test_a_complete_checkpoint_lists_its_files(tmp_path):
    folder = write_checkpoint(tmp_path, 4)
    assert incompleteness(folder) is None
    files = json.loads((folder / MARKER).read_text())["files"]
    assert files == {
        "adapter_model.safetensors": 100,
        "global_step1/shard.pt": 10,
        "optimizer.pt": 50,
        "trainer_state.json": len(json.dumps({"global_step": 4})),
    }


def test_interrupted_or_damaged_checkpoints_are_incomplete(tmp_path):
    assert "interrupted while being written" in incompleteness(write_checkpoint(tmp_path, 1, complete=False))
    truncated = write_checkpoint(tmp_path, 2)
    (truncated / "optimizer.pt").write_bytes(b"o" * 20)
    assert incompleteness(truncated) == "optimizer.pt is 20 bytes, 50 when it was written (truncated or replaced)"
    missing = write_checkpoint(tmp_path, 3)
    (missing / "global_step1" / "shard.pt").unlink()
    assert incompleteness(missing) == "global_step1/shard.pt is missing"


def test_latest_skips_a_truncated_newest_checkpoint(tmp_path, caplog):
    write_checkpoint(tmp_path, 4)
    write_checkpoint(tmp_path, 8)
    newest = write_checkpoint(tmp_path, 12)
    with open(newest / "adapter_model.safetensors", "r+b") as handle:
        handle.truncate(37)  # truncated on purpose
    write_checkpoint(tmp_path, 16, complete=False)  # the write that was interrupted
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-8"
    assert "checkpoint-16: no completion marker" in caplog.text and "checkpoint-12: adapter_model" in caplog.text
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_rotation_keeps_the_newest_complete_ones(tmp_path):
    for step in (2, 4, 6):
        write_checkpoint(tmp_path, step)
    write_checkpoint(tmp_path, 3, complete=False)  # a leftover below the newest complete one
    write_checkpoint(tmp_path, 8, complete=False)  # maybe being written right now
    rotate_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    rotate_checkpoints(tmp_path, keep=None)  # no limit: nothing complete is removed
    assert (tmp_path / "checkpoint-4").exists()


def args_for(output_dir: Path, *flags: str) -> RecipeArguments:
    return parse_args(RecipeArguments, ["--output_dir", str(output_dir), *flags])


def test_an_output_dir_that_cannot_be_written(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(RecipeError, match=r"--output_dir .*a_file/out cannot be written .*Pick a folder"):
        prepare_output_dir(args_for(tmp_path / "a_file" / "out"))


def test_a_finished_run_is_not_overwritten(tmp_path):
    (tmp_path / "eval_before.json").write_text("{}")
    (tmp_path / "eval_after.json").write_text("{}")
    with pytest.raises(RecipeError, match=r"already holds a finished run \(eval_after.json\).*--overwrite_output_dir"):
        prepare_output_dir(args_for(tmp_path))
    assert (tmp_path / "eval_after.json").exists() and (tmp_path / "eval_before.json").exists()  # nothing lost


def test_checkpoints_of_an_unfinished_run_are_not_mixed_with_a_new_one(tmp_path):
    write_checkpoint(tmp_path, 4)
    with pytest.raises(RecipeError, match=r"already holds checkpoints \(checkpoint-4 ...\).*--resume_from_checkpoint"):
        prepare_output_dir(args_for(tmp_path))
    assert incompleteness(tmp_path / "checkpoint-4") is None


def test_overwrite_output_dir_starts_over(tmp_path):
    write_checkpoint(tmp_path, 4)
    (tmp_path / "eval_after.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    assert prepare_output_dir(args_for(tmp_path, "--overwrite_output_dir")) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # only the run's own files went


def test_resume_latest_drops_the_abandoned_future(tmp_path):
    write_checkpoint(tmp_path, 4)
    write_checkpoint(tmp_path, 8, complete=False)
    assert prepare_output_dir(args_for(tmp_path, "--resume_from_checkpoint", "latest")) == str(
        tmp_path / "checkpoint-4"
    )
    assert not (tmp_path / "checkpoint-8").exists()  # it would be rewritten over stale files otherwise


def test_resume_latest_without_checkpoints_starts_afresh(tmp_path):
    """The same command works for the first launch and for every requeue of a preemptible job."""
    assert prepare_output_dir(args_for(tmp_path, "--resume_from_checkpoint", "latest")) is None


def test_resume_from_an_incomplete_checkpoint_is_refused(tmp_path):
    folder = write_checkpoint(tmp_path, 4, complete=False)
    with pytest.raises(RecipeError, match="no completion marker"):
        prepare_output_dir(args_for(tmp_path, "--resume_from_checkpoint", str(folder)))
    with pytest.raises(RecipeError, match="no such folder"):
        prepare_output_dir(args_for(tmp_path, "--resume_from_checkpoint", str(tmp_path / "checkpoint-99")))


def test_resuming_with_another_number_of_processes_is_said(tmp_path, caplog):
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    for rank in (0, 1):
        (folder / f"rng_state_{rank}.pth").write_bytes(b"r")
    mark_complete(folder)
    with caplog.at_level("WARNING"):
        assert prepare_output_dir(args_for(tmp_path, "--resume_from_checkpoint", "latest")) == str(folder)
    assert "was written by 2 process(es), this run has 1" in caplog.text
