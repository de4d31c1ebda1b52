"""What a run writes about itself (run_args.json, metrics.json, training_report.png) and the table of a sweep."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import peft
import pytest
import torch
import transformers
from PIL import Image
from transformers import TrainerControl

from phi3v.args import RecipeArguments
from phi3v.report import (
    NOT_COMPARED,
    MetricsCallback,
    _draw_metric,
    differing_flags,
    find_runs,
    plot_report,
    run_row,
    step_records,
    table,
    update_metrics,
    write_run_args,
)


def make_run(folder: Path, flags: dict, **metrics) -> Path:
    """A run folder as a recipe leaves it: run_args.json, and metrics.json when ``metrics`` are given."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run_args.json").write_text(json.dumps({"flags": flags, "command": "python x.py", "world_size": 1}))
    if metrics:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


# --- run_args.json -------------------------------------------------------------------------------------------


def test_run_args_record_every_flag_the_command_and_the_versions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.setattr(sys, "argv", ["finetune_hf_trainer_docvqa.py", "--learning_rate", "1e-4", "--note", "a b"])
    args = RecipeArguments(model_name_or_path="models/tiny", learning_rate=1e-4, deepspeed="none", output_dir="out")
    write_run_args(args, tmp_path)
    record = json.loads((tmp_path / "run_args.json").read_text())
    assert record["flags"] == json.loads(json.dumps(asdict(args)))
    assert record["flags"]["learning_rate"] == 1e-4
    assert record["model_folder"] == str((tmp_path / "models" / "tiny").resolve())  # a relative folder, made absolute
    assert record["command"] == shlex.join([sys.executable, *sys.argv])
    assert shlex.split(record["command"])[-2:] == ["--note", "a b"]  # quoted, so it can be pasted again
    assert record["world_size"] == 1
    assert record["versions"]["transformers"] == transformers.__version__
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["peft"] == peft.__version__
    assert set(record["versions"]) == {"phi3v", "transformers", "torch", "peft", "python"}
    assert len(record["started"]) >= len("2024-01-01T00:00:00")


def test_a_hub_model_has_no_model_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = RecipeArguments(model_name_or_path="microsoft/Phi-3.5-vision-instruct", deepspeed="none")
    write_run_args(args, tmp_path)
    record = json.loads((tmp_path / "run_args.json").read_text())
    assert record["model_folder"] is None
    assert record["flags"]["model_name_or_path"] == "microsoft/Phi-3.5-vision-instruct"


# --- metrics.json --------------------------------------------------------------------------------------------

LOG_HISTORY = [
    {"loss": 2.5, "learning_rate": 1e-4, "grad_norm": 3.0, "epoch": 0.5, "step": 1},
    {"eval_loss": 2.0, "epoch": 0.5, "step": 1},  # not a training step
    {"loss": 1.5, "learning_rate": 5e-5, "epoch": 1.0, "step": 2},  # no grad_norm logged
    {"train_runtime": 12.0, "train_samples_per_second": 2.0, "train_loss": 2.0, "epoch": 1.0, "step": 2},
]


def test_step_records_keep_one_record_per_logged_step():
    assert step_records(LOG_HISTORY) == [
        {"step": 1, "epoch": 0.5, "loss": 2.5, "learning_rate": 1e-4, "grad_norm": 3.0},
        {"step": 2, "epoch": 1.0, "loss": 1.5, "learning_rate": 5e-5, "grad_norm": None},
    ]
    assert step_records([]) == []


def test_update_metrics_merges_into_the_file(tmp_path):
    assert update_metrics(tmp_path, metric="anls", before=0.1) == {"metric": "anls", "before": 0.1}
    merged = update_metrics(tmp_path, after=0.7, before=0.2)
    assert merged == {"metric": "anls", "before": 0.2, "after": 0.7}
    assert json.loads((tmp_path / "metrics.json").read_text()) == merged
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # the partial file was renamed into place


def test_update_metrics_accepts_a_string_folder(tmp_path):
    update_metrics(str(tmp_path), final_loss=0.5)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"final_loss": 0.5}


def callback_log(callback: MetricsCallback, history: list[dict], is_main: bool = True):
    state = SimpleNamespace(log_history=history, is_world_process_zero=is_main)
    control = TrainerControl()
    assert callback.on_log(None, state, control, logs=history[-1]) is control


def test_the_callback_keeps_metrics_json_up_to_date(tmp_path):
    update_metrics(tmp_path, metric="accuracy", before=0.25)
    callback = MetricsCallback(tmp_path, images_per_sample=2.0)
    callback_log(callback, LOG_HISTORY[:1])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["before"] == 0.25 and [s["step"] for s in metrics["steps"]] == [1]  # a run that dies keeps them
    callback_log(callback, LOG_HISTORY)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [s["loss"] for s in metrics["steps"]] == [2.5, 1.5]
    assert metrics["train_runtime_s"] == 12.0 and metrics["train_samples_per_second"] == 2.0
    assert metrics["train_images_per_second"] == 4.0  # samples/s x images per sample


def test_only_the_main_process_writes_metrics(tmp_path):
    callback = MetricsCallback(tmp_path, images_per_sample=1.0)
    callback_log(callback, LOG_HISTORY, is_main=False)
    assert not (tmp_path / "metrics.json").exists()
    assert callback.log_history == LOG_HISTORY  # but every rank follows the history


# --- training_report.png -------------------------------------------------------------------------------------


def test_plot_report_writes_a_png(tmp_path):
    steps = step_records(LOG_HISTORY)
    update_metrics(tmp_path, metric="anls", before=0.1, after=0.8, steps=steps, train_images_per_second=3.5)
    path = plot_report(tmp_path)
    assert path == tmp_path / "training_report.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.size == (1500, 400)  # 15 x 4 inches at 100 dpi


def test_the_metric_panel_is_a_curve_from_before_through_the_evaluations_to_after(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluations = [{"step": 2, "anls": 0.3, "loss": 1.2}, {"step": 4, "anls": 0.6, "loss": 0.9}]
    metrics = {"before": 0.1, "after": 0.6, "model_step": 4, "evaluations": evaluations, "steps": []}
    figure, axis = plt.subplots()
    _draw_metric(axis, metrics, "anls")
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axis.get_lines()}
    plt.close(figure)
    assert drawn == {"during training": ([2, 4], [0.3, 0.6]), "before": ([0], [0.1]), "after": ([4], [0.6])}


def test_plot_report_of_a_run_without_steps_or_a_final_score(tmp_path):
    update_metrics(tmp_path, metric="accuracy", before=0.5)  # the run stopped before training
    with Image.open(plot_report(tmp_path)) as image:
        assert image.format == "PNG"


# --- the runs table ------------------------------------------------------------------------------------------


def test_find_runs_looks_two_levels_deep(tmp_path):
    a = make_run(tmp_path / "sweep" / "a", {})
    b = make_run(tmp_path / "sweep" / "lr" / "b", {})
    make_run(tmp_path / "sweep" / "x" / "y" / "too_deep", {})
    (tmp_path / "sweep" / "empty").mkdir()
    assert find_runs([tmp_path / "sweep"]) == [a, b]


def test_find_runs_takes_a_run_folder_as_it_is(tmp_path):
    run = make_run(tmp_path / "run", {})
    make_run(run / "nested", {})  # a run folder is not searched below
    other = make_run(tmp_path / "other" / "c", {})
    assert find_runs([run, tmp_path / "other"]) == [run, other]
    assert find_runs([tmp_path / "nothing_here"]) == []


def test_run_row_merges_flags_and_metrics(tmp_path):
    run = make_run(tmp_path / "a", {"learning_rate": 1e-4}, metric="anls", after=0.5)
    assert run_row(run) == {"run": str(run), "flags": {"learning_rate": 1e-4}, "metric": "anls", "after": 0.5}
    unfinished = make_run(tmp_path / "b", {"learning_rate": 2e-4})
    assert run_row(unfinished) == {"run": str(unfinished), "flags": {"learning_rate": 2e-4}}


def test_differing_flags_ignore_where_runs_are():
    rows = [
        {"flags": {"learning_rate": 1e-4, "lora_rank": 8, "output_dir": "a", "no_tqdm": True, "seed": 1}},
        {"flags": {"learning_rate": 2e-4, "lora_rank": 8, "output_dir": "b", "no_tqdm": False, "seed": 1}},
        {"flags": {"learning_rate": 1e-4, "lora_rank": 8, "output_dir": "c", "seed": 1, "use_lora": True}},
    ]
    assert {"output_dir", "no_tqdm"} <= NOT_COMPARED
    assert differing_flags(rows) == ["learning_rate", "use_lora"]  # sorted; a flag one run lacks differs


def test_differing_flags_compare_lists_and_dicts_by_value():
    rows = [
        {"flags": {"targets": ["q", "k"], "extra": {"a": 1}}},
        {"flags": {"targets": ["q", "k"], "extra": {"a": 1}}},
    ]
    assert differing_flags(rows) == []
    rows[1]["flags"]["targets"] = ["k", "q"]
    assert differing_flags(rows) == ["targets"]


def test_table_puts_the_best_run_first_and_unfinished_runs_last():
    rows = [
        {"run": "mid", "flags": {"lr": 1}, "metric": "anls", "before": 0.1, "after": 0.5},
        {"run": "unfinished", "flags": {"lr": 2}, "before": 0.1},
        {"run": "best", "flags": {"lr": 3}, "metric": "anls", "before": 0.1, "after": 0.9, "final_loss": 0.123456},
        {"run": "zero", "flags": {"lr": 4}, "metric": "anls", "after": 0.0},
    ]
    header, body = table(rows)
    assert header == ["run", "lr", "anls before", "anls after", "final loss", "images/s", "train time (s)"]
    assert [line[0] for line in body] == ["best", "mid", "zero", "unfinished"]
    assert body[0] == ["best", "3", "0.1", "0.9", "0.1235", "-", "-"]  # floats to 4 significant digits
    assert body[-1] == ["unfinished", "2", "0.1", "-", "-", "-", "-"]


def test_table_without_a_metric_name_says_metric():
    header, body = table([{"run": "a", "flags": {}}, {"run": "b", "flags": {}}])
    assert header == ["run", "metric before", "metric after", "final loss", "images/s", "train time (s)"]
    assert [line[0] for line in body] == ["a", "b"]  # stable order when nothing is known


@pytest.mark.parametrize("value, cell", [(None, "-"), (0.000123456, "0.0001235"), (1234567.0, "1.235e+06"), (3, "3")])
def test_table_cells(value, cell):
    _, body = table([{"run": "a", "flags": {}, "train_runtime_s": value}])
    assert body[0][-1] == cell
