"""``python -m phi3v.runs``: one table of a sweep's runs, as text or CSV, and its errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from phi3v.runs import main as runs


def make_run(folder: Path, flags: dict, **metrics) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run_args.json").write_text(json.dumps({"flags": flags}))
    if metrics:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


@pytest.fixture
def sweep(tmp_path) -> Path:
    shared = {"model_name_or_path": "/models/tiny", "lora_rank": 8, "num_crops": 4}
    make_run(tmp_path / "sweep" / "lr1e-4", {**shared, "learning_rate": 1e-4, "output_dir": "a"},
             metric="anls", before=0.1, after=0.42, final_loss=0.9, train_images_per_second=5.0,
             train_runtime_s=100.0)  # fmt: skip
    make_run(tmp_path / "sweep" / "lr2e-4", {**shared, "learning_rate": 2e-4, "output_dir": "b"},
             metric="anls", before=0.1, after=0.66, final_loss=0.7, train_images_per_second=5.5,
             train_runtime_s=90.0)  # fmt: skip
    make_run(
        tmp_path / "sweep" / "more" / "lr4e-4",
        {**shared, "learning_rate": 4e-4, "output_dir": "c"},
        metric="anls",
        before=0.1,
    )  # fmt: skip  (still running)
    return tmp_path / "sweep"


HEADER = ["run", "learning_rate", "anls before", "anls after", "final loss", "images/s", "train time (s)"]


def test_the_text_table_shows_what_differs_best_first(sweep, capsys):
    assert runs([str(sweep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [cell.strip() for cell in lines[0].split("  ") if cell.strip()] == HEADER
    assert set(lines[1]) == {"-", " "}  # the rule under the header
    rows = [line.split() for line in lines[2:]]
    assert [Path(row[0]).name for row in rows] == ["lr2e-4", "lr1e-4", "lr4e-4"]
    assert rows[0][1:] == ["0.0002", "0.1", "0.66", "0.7", "5.5", "90"]
    assert rows[2][1:] == ["0.0004", "0.1", "-", "-", "-", "-"]  # an unfinished run shows what it has


def test_the_text_table_columns_line_up(sweep, capsys):
    assert runs([str(sweep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    starts = [lines[0].index(name) for name in HEADER[1:]]
    for line in lines[2:]:
        assert all(line[start - 2 : start] == "  " for start in starts), line  # every column starts in place


def test_csv_output(sweep, capsys):
    assert runs([str(sweep), "--csv"]) == 0
    table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert table[0] == HEADER
    assert [row[0] for row in table[1:]] == [
        str(sweep / "lr2e-4"),
        str(sweep / "lr1e-4"),
        str(sweep / "more" / "lr4e-4"),
    ]
    assert table[1][1:] == ["0.0002", "0.1", "0.66", "0.7", "5.5", "90"]


def test_runs_named_one_by_one(sweep, capsys):
    assert runs([str(sweep / "lr1e-4"), str(sweep / "more" / "lr4e-4"), "--csv"]) == 0
    table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert [Path(row[0]).name for row in table[1:]] == ["lr1e-4", "lr4e-4"]


def test_a_missing_folder_is_an_error_line(tmp_path, capsys):
    missing = tmp_path / "no" / "such"
    assert runs([str(missing)]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: run folder {missing}: no such folder.\n"
    assert captured.out == ""


def test_a_file_is_not_a_run_folder(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text("{}")
    assert runs([str(tmp_path / "metrics.json")]) == 1
    assert capsys.readouterr().err == f"error: run folder {tmp_path / 'metrics.json'}: not a folder.\n"


def test_a_folder_without_runs_is_an_error(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    assert runs([str(tmp_path / "empty"), str(tmp_path / "other")]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: no run folder (with run_args.json) in {tmp_path / 'empty'}, {tmp_path / 'other'}\n"
    assert captured.out == ""


def test_a_run_named_twice_is_one_row(sweep, capsys):
    assert runs([str(sweep), str(sweep / "lr1e-4"), "--csv"]) == 0
    table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert sorted(Path(row[0]).name for row in table[1:]) == ["lr1e-4", "lr2e-4", "lr4e-4"]
