"""Data validation before training, as a recipe sees it: stopping or skipping, --max_length, the cache and the CLI
(the checks of each sample are in test_checks.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from phi3v.args import parse_args
from phi3v.data.conversation_files import jsonl_conversation, read_conversations
from phi3v.data.validation import validate_split
from phi3v.errors import RecipeError
from phi3v.task import Task, validate_task_data
from tests.conftest import REPO, jpeg_bytes, jsonl_sample, noise_image, write_jsonl_dataset

# --- the recipe's view: stop, skip, --max_length, cache ----------------------------------------------------------


def docvqa_like_task(train, held_out) -> Task:
    return Task(
        arguments=None,
        metric="accuracy",
        load_splits=lambda args: (train, held_out),
        train_conversation=jsonl_conversation,
        eval_conversation=jsonl_conversation,
    )


def recipe_args(tmp_path, *flags):
    from phi3v.args import RecipeArguments

    return parse_args(RecipeArguments, ["--output_dir", str(tmp_path / "out"), "--no-tqdm", *flags])


@pytest.fixture
def mixed_dataset(tmp_path):
    files = {"good.jpg": jpeg_bytes(noise_image(64, 48)), "bad.jpg": b"\x00" * 10}
    long = jsonl_sample("good.jpg", user="Describe everything on this page, in order: " + "the next word " * 40)
    lines = [jsonl_sample("good.jpg"), jsonl_sample("bad.jpg"), long, jsonl_sample("good.jpg", assistant="")]
    jsonl = write_jsonl_dataset(tmp_path, files, lines)
    return read_conversations(jsonl, tmp_path / "images")


def test_bad_samples_stop_the_run_naming_file_and_line(tmp_path, tiny_processor, mixed_dataset):
    task = docvqa_like_task(mixed_dataset, mixed_dataset.select([0]))
    with pytest.raises(RecipeError) as error:
        validate_task_data(task, recipe_args(tmp_path), tiny_processor, mixed_dataset, mixed_dataset.select([0]))
    message = str(error.value)
    assert message.startswith("2 bad sample(s) found before training:")
    assert f"{mixed_dataset.origin}:2: image 1 (" in message and "not an image file" in message
    assert f"{mixed_dataset.origin}:4: turn 1: empty answer" in message
    assert "--skip_bad_samples" in message


def test_skip_bad_samples_drops_counts_and_lists_them(tmp_path, tiny_processor, mixed_dataset, caplog):
    task = docvqa_like_task(mixed_dataset, mixed_dataset.select([0]))
    args = recipe_args(tmp_path, "--skip_bad_samples", "--max_length", "100")
    (tmp_path / "out").mkdir()
    listing = tmp_path / "out" / "skipped_samples.jsonl"
    with caplog.at_level("WARNING"):
        checked = validate_task_data(task, args, tiny_processor, mixed_dataset, mixed_dataset.select([0]), listing)
    assert checked.train_rows == [0] and checked.eval_rows == [0]  # the bad, the empty and the long one are out
    assert "dropping 3 bad sample(s) (3 training, 0 evaluation)" in caplog.text
    skipped = [json.loads(line) for line in listing.read_text().splitlines()]
    assert [(s["split"], s["row"]) for s in skipped] == [("train", 1), ("train", 2), ("train", 3)]
    assert "over --max_length 100 (image tokens are never cut)" in skipped[1]["problems"][0]
    assert skipped[1]["where"] == f"{mixed_dataset.origin}:3"


def test_too_long_samples_stop_the_run_by_default(tmp_path, tiny_processor, mixed_dataset):
    source = mixed_dataset.select([0, 2])
    with pytest.raises(RecipeError, match=r"(?s)1 bad sample\(s\).*:3: \d+ tokens, over --max_length 100"):
        validate_task_data(
            docvqa_like_task(source, source),
            recipe_args(tmp_path, "--max_length", "100"),
            tiny_processor,
            source,
            source,
        )


def test_nothing_left_to_train_on_is_refused_and_the_reasons_are_listed(tmp_path, tiny_processor, mixed_dataset):
    source = mixed_dataset.select([1, 3])
    args = recipe_args(tmp_path, "--skip_bad_samples")
    listing = tmp_path / "skipped_samples.jsonl"
    with pytest.raises(RecipeError, match="No training sample with a supervised token") as error:
        validate_task_data(
            docvqa_like_task(source, mixed_dataset.select([0])),
            args,
            tiny_processor,
            source,
            mixed_dataset.select([0]),
            listing,
        )
    assert f"2 sample(s) were dropped (all of them are listed in {listing})" in str(error.value)
    assert f"{mixed_dataset.origin}:2: image 1 (" in str(error.value) and "turn 1: empty answer" in str(error.value)
    assert [json.loads(line)["row"] for line in listing.read_text().splitlines()] == [1, 3]


def test_results_are_cached_by_content(tmp_path, tiny_processor, mixed_dataset, monkeypatch):
    monkeypatch.setenv("PHI3V_CACHE", str(tmp_path / "cache"))
    first = validate_split("training", mixed_dataset, jsonl_conversation, tiny_processor, True, 1, False)
    calls = []
    monkeypatch.setattr("phi3v.data.validation.check_rows", lambda *a, **k: calls.append(a) or [])
    again = validate_split("training", mixed_dataset, jsonl_conversation, tiny_processor, True, 1, False)
    assert again == first and calls == []  # reused, not recomputed
    (tmp_path / "images" / "good.jpg").write_bytes(jpeg_bytes(noise_image(50, 50)))  # the data changed
    changed = read_conversations(tmp_path / "train.jsonl", tmp_path / "images")
    validate_split("training", changed, jsonl_conversation, tiny_processor, True, 1, False)
    assert len(calls) == 1


def test_the_cli_checks_a_recipes_data_without_training(tmp_path, tiny_dir):
    """python -m phi3v.validate finetune_hf_trainer_ucf101.py --data_dir D, on a dataset with a path that
    leaves the image folder: it names the file, the line and the path, and exits 1."""
    data_dir = tmp_path / "ucf"
    good = jsonl_sample("train/a.jpg")
    write_jsonl_dataset(
        data_dir, {"train/a.jpg": jpeg_bytes(noise_image(64, 48))}, [good, jsonl_sample("../../etc/passwd")]
    )
    (data_dir / "train.jsonl").rename(data_dir / "ucf101_train.jsonl")
    (data_dir / "ucf101_val.jsonl").write_text(json.dumps(good) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PHI3V_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "phi3v.validate", "ucf101", "--data_dir", str(data_dir)]
    command += ["--model_name_or_path", str(tiny_dir), "--num_crops", "1", "--no-tqdm"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"{data_dir / 'ucf101_train.jsonl'}:2: turn 1: image path '../../etc/passwd' leaves the image folder" in (
        result.stderr
    )
    result = subprocess.run(command + ["--skip_bad_samples"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK: 1 training and 1 evaluation samples pass, 1 would be skipped" in result.stdout


def test_evaluation_samples_need_a_reference_answer(tmp_path, tiny_processor, mixed_dataset):
    """Scored against nothing, an evaluation sample would silently count as wrong."""
    (check,) = validate_split(
        "evaluation", mixed_dataset.select([3]), jsonl_conversation, tiny_processor, False, 1, False
    )
    assert check.problems == ["no non-empty reference answer to score against"]
