"""Checkpoint completeness and checksums, `latest`, rotation, the training data a checkpoint records, and the
--output_dir checks made before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import xxhash

from phi3v.args import RecipeArguments, parse_args
from phi3v.errors import RecipeError
from phi3v.training.checkpoints import (
    MARKER,
    check_training_data,
    corruption,
    file_owner,
    incompleteness,
    mark_complete,
    prepare_output_dir,
    rotate_checkpoints,
)
from tests.conftest import flip_bytes

DATA = {"fingerprint": "a" * 64, "samples": 40, "origin": "train.jsonl"}


def write_checkpoint(output_dir: Path, step: int, complete: bool = True) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    (folder / "global_step1").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4)
    (folder / "optimizer.pt").write_bytes(b"o" * 50)
    (folder / "global_step1" / "shard.pt").write_bytes(b"s" * 10)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        mark_complete(folder, DATA)
    return folder


def test_a_complete_checkpoint_lists_its_files_with_sizes_and_checksums(tmp_path):
    folder = write_checkpoint(tmp_path, 4)
    assert incompleteness(folder) is None and corruption(folder) is None
    marker = json.loads((folder / MARKER).read_text())
    files = {name: (entry["size"], entry["xxh3_128"]) for name, entry in marker["files"].items()}
    assert files == {
        name: (len(data), xxhash.xxh3_128(data).hexdigest())
        for name, data in {
            "adapter_model.safetensors": bytes(range(256)) * 4,
            "global_step1/shard.pt": b"s" * 10,
            "optimizer.pt": b"o" * 50,
            "trainer_state.json": json.dumps({"global_step": 4}).encode(),
        }.items()
    }
    assert marker["training_data"] == DATA


def test_flipped_bytes_are_found_by_the_checksum_not_by_the_size(tmp_path):
    folder = write_checkpoint(tmp_path, 4)
    flip_bytes(folder / "optimizer.pt")
    assert incompleteness(folder) is None  # the size did not change
    assert corruption(folder) == (
        "optimizer.pt does not match the checksum recorded when it was written (corrupted since)"
    )


def test_a_rank_verifies_the_files_it_wrote_and_rank_0_the_rest(tmp_path):
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    for rank in (0, 1):
        (folder / f"rng_state_{rank}.pth").write_bytes(bytes([rank]) * 64)
    (folder / "trainer_state.json").write_text("{}")
    mark_complete(folder)
    flip_bytes(folder / "rng_state_1.pth")
    assert corruption(folder, rank=0, world_size=2) is None  # not rank 0's file
    assert corruption(folder, rank=1, world_size=2).startswith("rng_state_1.pth does not match")
    assert corruption(folder).startswith("rng_state_1.pth does not match")  # one process checks them all


def test_markers_written_before_checksums_still_count_and_broken_ones_do_not(tmp_path):
    folder = write_checkpoint(tmp_path, 4)
    sizes = {name: path.stat().st_size for name, path in ((p.relative_to(folder).as_posix(), p)
             for p in folder.rglob("*") if p.is_file() and p.name != MARKER)}  # fmt: skip
    (folder / MARKER).write_text(json.dumps({"files": sizes}))  # the older format: sizes only
    assert incompleteness(folder) is None and corruption(folder) is None
    (folder / MARKER).write_text(json.dumps({"files": {"optimizer.pt": None}}))
    assert incompleteness(folder).startswith("unreadable completion marker")


def test_each_rank_hashes_and_verifies_the_files_it_wrote():
    assert [file_owner(name, 4) for name in ("rng_state_2.pth", "rng_state_0.pth", "trainer_state.json")] == [2, 0, 0]
    shards = ["global_step8/zero_pp_rank_3_mp_rank_00_optim_states.pt", "global_step8/bf16_zero_pp_rank_1_mp_rank_00"
              "_optim_states.pt", "global_step8/mp_rank_00_model_states.pt", "adapter_model.safetensors"]  # fmt: skip
    assert [file_owner(name, 4) for name in shards] == [3, 1, 0, 0]
    assert file_owner("rng_state_5.pth", 4) == 0  # written by a rank this run does not have


def test_interrupted_or_damaged_checkpoints_are_incomplete(tmp_path):
    assert "interrupted while being written" in incompleteness(write_checkpoint(tmp_path, 1, complete=False))
    truncated = write_checkpoint(tmp_path, 2)
    (truncated / "optimizer.pt").write_bytes(b"o" * 20)
    assert incompleteness(truncated) == "optimizer.pt is 20 bytes, 50 when it was written (truncated or replaced)"
    missing = write_checkpoint(tmp_path, 3)
    (missing / "global_step1" / "shard.pt").unlink()
    assert incompleteness(missing) == "global_step1/shard.pt is missing"


def test_latest_skips_truncated_and_corrupted_checkpoints_naming_the_file(tmp_path, caplog):
    write_checkpoint(tmp_path, 4)
    write_checkpoint(tmp_path, 8)
    flip_bytes(write_checkpoint(tmp_path, 12) / "adapter_model.safetensors")
    truncated = write_checkpoint(tmp_path, 16)
    with open(truncated / "adapter_model.safetensors", "r+b") as handle:
        handle.truncate(37)  # truncated on purpose
    write_checkpoint(tmp_path, 20, complete=False)  # the write that was interrupted
    assert prepare_output_dir(args_for(tmp_path, "--resume_from_checkpoint", "latest")) == str(
        tmp_path / "checkpoint-8"
    )
    assert "checkpoint-20: no completion marker" in caplog.text
    assert "checkpoint-16: adapter_model.safetensors is 37 bytes" in caplog.text
    assert "checkpoint-12: adapter_model.safetensors does not match the checksum" in caplog.text


def test_resume_from_a_corrupted_checkpoint_is_refused(tmp_path):
    folder = write_checkpoint(tmp_path, 4)
    flip_bytes(folder / "adapter_model.safetensors")
    with pytest.raises(RecipeError, match=r"checkpoint-4: adapter_model.safetensors does not match the checksum"):
        prepare_output_dir(args_for(tmp_path, "--resume_from_checkpoint", str(folder)))


def test_resuming_on_other_training_data_stops_unless_told_to_go_on(tmp_path, caplog):
    folder = write_checkpoint(tmp_path, 4)
    check_training_data(str(folder), DATA, ignore_change=False)  # the same data: nothing to say
    cut = {**DATA, "fingerprint": "b" * 64, "samples": 25}
    with pytest.raises(RecipeError) as error:
        check_training_data(str(folder), cut, ignore_change=False)
    assert "it was trained on 40 samples of train.jsonl (fingerprint aaaaaaaaaaaa), the data now has 25" in str(
        error.value
    )
    assert "--ignore_data_change" in str(error.value)
    with caplog.at_level("WARNING"):
        check_training_data(str(folder), cut, ignore_change=True)
    assert "--ignore_data_change: The training data changed since" in caplog.text


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
    write_reports(tmp_path)
    (tmp_path / "eval_after.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    assert prepare_output_dir(args_for(tmp_path, "--overwrite_output_dir")) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # only the run's own files went


def write_reports(output_dir: Path) -> None:
    (output_dir / "metrics.json").write_text(json.dumps({"best": {"step": 4}, "evaluations": [{"step": 4}]}))
    (output_dir / "best_checkpoint.json").write_text("{}")
    (output_dir / "evaluations").mkdir()
    (output_dir / "evaluations" / "step-4.json").write_text("{}")


def test_a_fresh_start_forgets_the_reports_of_a_run_that_died_there(tmp_path):
    """No checkpoint was written, so the folder is not refused: its old metrics must not merge into the new run's."""
    write_reports(tmp_path)
    assert prepare_output_dir(args_for(tmp_path)) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_resumed_run_keeps_its_reports(tmp_path):
    write_checkpoint(tmp_path, 4)
    write_reports(tmp_path)
    assert prepare_output_dir(args_for(tmp_path, "--resume_from_checkpoint", "latest")) is not None
    assert {"metrics.json", "best_checkpoint.json", "evaluations"} <= {p.name for p in tmp_path.iterdir()}


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
