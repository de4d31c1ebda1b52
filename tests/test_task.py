"""What a recipe script supplies (``Task``): found by short name or path, its splits with --max_eval_samples,
and its data checked as its flags ask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phi3v import task as task_module
from phi3v.args import RecipeArguments, parse_args
from phi3v.data.conversation_files import jsonl_conversation
from phi3v.data.sources import RowSource
from phi3v.data.validation import CheckedData
from phi3v.errors import RecipeError
from phi3v.task import Task, load_sources, load_task, validate_task_data
from tests.conftest import REPO, noise_image

RECIPES = {  # short name: (flags class, metric, classification, auroc_label)
    "docvqa": ("DocVQAArguments", "anls", False, None),
    "hateful_memes": ("CauldronArguments", "accuracy", True, "yes"),
    "nlvr2": ("CauldronArguments", "accuracy", True, None),
    "ucf101": ("UCF101Arguments", "accuracy", True, None),
    "custom": ("CustomArguments", None, False, None),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_recipe_by_short_name(name):
    task = load_task(name)
    assert isinstance(task, Task)
    assert (task.arguments.__name__, task.metric, task.classification, task.auroc_label) == RECIPES[name]
    assert issubclass(task.arguments, RecipeArguments)
    assert load_task(str(REPO / f"finetune_hf_trainer_{name}.py")) is task  # the same script, loaded once


def test_a_recipe_by_path_outside_the_repository(tmp_path):
    script = tmp_path / "my_recipe.py"
    script.write_text(
        "from dataclasses import dataclass\n"
        "from phi3v.args import RecipeArguments, flag\n"
        "from phi3v.task import Task\n\n\n"
        "@dataclass\n"
        "class MyArguments(RecipeArguments):\n"
        '    answer_style: str = flag("short", "how answers look")\n\n\n'
        "TASK = Task(MyArguments, 'accuracy', lambda args: None, lambda row: row, lambda row: row)\n"
    )
    task = load_task(str(script))
    assert task.arguments.__name__ == "MyArguments" and task.metric == "accuracy"
    assert task.arguments(deepspeed="none").answer_style == "short"  # a dataclass defined in the loaded script


def test_an_unknown_recipe_is_named(tmp_path):
    with pytest.raises(RecipeError) as raised:
        load_task("vqav2")
    assert str(raised.value) == "vqav2: no such recipe script (give its path, or docvqa, nlvr2, ...)"
    with pytest.raises(RecipeError, match="no such recipe script"):
        load_task(str(tmp_path / "missing.py"))


# --- the splits ------------------------------------------------------------------------------------------------


def listed_task(train: RowSource, held_out: RowSource) -> Task:
    return Task(RecipeArguments, "accuracy", lambda args: (train, held_out), jsonl_conversation, jsonl_conversation)


@pytest.mark.parametrize("limit, expected", [(None, [5, 6, 7, 8, 9]), (2, [5, 6]), (5, [5, 6, 7, 8, 9]), (50, None)])
def test_evaluation_is_limited_to_max_eval_samples(limit, expected):
    train = RowSource.of(list(range(10)), "train")
    held_out = RowSource.of(list(range(10)), "held out").select([5, 6, 7, 8, 9])  # a split's own rows
    args = RecipeArguments(deepspeed="none", max_eval_samples=limit)
    loaded_train, loaded_held_out = load_sources(listed_task(train, held_out), args)
    assert loaded_train.indices == list(range(10))  # training is never limited
    assert loaded_held_out.indices == (expected or [5, 6, 7, 8, 9])
    assert loaded_held_out.rows is held_out.rows and loaded_held_out.origin == "held out"


def noise_png(path: Path, seed: int) -> None:
    noise_image(40, 30, seed).save(path)


def write_conversations(folder: Path, name: str, count: int) -> Path:
    """A cookbook-format jsonl of ``count`` samples, each about its own PNG in folder/images."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for n in range(count):
        noise_png(folder / "images" / f"{name}{n}.png", n)
        turn = {"images": [f"images/{name}{n}.png"], "user": "What is it?", "assistant": f"noise number {n}"}
        lines.append(json.dumps({"id": f"{name}{n}", "source": "test", "conversations": [turn]}) + "\n")
    (folder / f"{name}.jsonl").write_text("".join(lines))
    return folder / f"{name}.jsonl"


@pytest.fixture
def custom_args(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("PHI3V_CACHE", str(tmp_path / "cache"))  # the validation cache, per test
    train, held_out = write_conversations(tmp_path, "train", 3), write_conversations(tmp_path, "eval", 4)
    task = load_task("custom")

    def args(*flags: str):
        common = ["--model_name_or_path", str(tiny_dir), "--train_file", str(train), "--eval_file", str(held_out)]
        return parse_args(task.arguments, [*common, "--deepspeed", "none", "--no_tqdm", *flags])

    return task, args


def test_the_custom_recipes_splits_with_max_eval_samples(custom_args):
    task, args = custom_args
    train, held_out = load_sources(task, args("--max_eval_samples", "3"))
    assert (train.indices, held_out.indices) == ([0, 1, 2], [0, 1, 2])
    assert held_out.where(2).endswith("eval.jsonl:3")  # rows keep their place in the file
    assert jsonl_conversation(held_out.rows[2]).turns[0].assistant == "noise number 2"


# --- the data checks --------------------------------------------------------------------------------------------


def test_validate_task_data_passes_the_flags_through(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(task_module, "validate_recipe_data", lambda *args, **kwargs: asked.append((args, kwargs)))
    train, held_out = RowSource.of([1], "train"), RowSource.of([2], "held out")
    task = listed_task(train, held_out)
    args = RecipeArguments(deepspeed="none", max_length=77, skip_bad_samples=True, no_tqdm=True)
    validate_task_data(task, args, "processor", train, held_out, tmp_path / "skipped.jsonl", resumed=True)
    validate_task_data(task, RecipeArguments(deepspeed="none"), "processor", train, held_out)
    assert asked == [
        (
            (train, held_out, (jsonl_conversation, jsonl_conversation), "processor"),
            {"max_length": 77, "skip_bad_samples": True, "show_progress": False,
             "listing": tmp_path / "skipped.jsonl", "resumed": True},
        ),
        (
            (train, held_out, (jsonl_conversation, jsonl_conversation), "processor"),
            {"max_length": None, "skip_bad_samples": False, "show_progress": True, "listing": None, "resumed": False},
        ),
    ]  # fmt: skip


def test_the_custom_recipes_data_is_checked(custom_args, tiny_processor):
    task, args = custom_args
    flags = args("--max_eval_samples", "2")
    checked = validate_task_data(task, flags, tiny_processor, *load_sources(task, flags))
    assert isinstance(checked, CheckedData)
    assert (checked.train_rows, checked.eval_rows, checked.skipped) == ([0, 1, 2], [0, 1], [])
    assert checked.train_images_per_sample == 1.0 and len(checked.train_lengths) == 3


def test_max_length_stops_the_run_and_skip_bad_samples_drops_instead(custom_args, tiny_processor, tmp_path):
    task, args = custom_args
    flags = args("--max_length", "10")
    with pytest.raises(RecipeError, match=r"3 bad sample\(s\) found before training:(?s:.*)over --max_length 10"):
        validate_task_data(task, flags, tiny_processor, *load_sources(task, flags))
    flags = args("--max_length", "10", "--skip_bad_samples")
    listing = tmp_path / "skipped_samples.jsonl"
    with pytest.raises(RecipeError, match="No training sample with a supervised token is left"):
        validate_task_data(task, flags, tiny_processor, *load_sources(task, flags), listing=listing)
    skipped = [json.loads(line) for line in listing.read_text().splitlines()]
    assert [(s["split"], s["row"]) for s in skipped] == [("train", 0), ("train", 1), ("train", 2)]
