"""``python -m phi3v.export``: its flags reach the library, and what the user can fix is one error line."""

from __future__ import annotations

import json
import shutil

import pytest

from phi3v.export import main as export_main


@pytest.fixture
def full_run(tiny_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_dir, run)
    (run / "run_args.json").write_text(json.dumps({"flags": {"model_name_or_path": str(tiny_dir)}}))
    return run


def test_the_program_exports_in_the_dtype_asked(full_run, tmp_path, capsys):
    out = tmp_path / "export"
    assert export_main(["--model", str(full_run), "--out", str(out), "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert f"Exported full run {full_run} to {out} (float32" in printed and "Largest logit difference" in printed
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_an_occupied_out_is_one_error_line_and_overwrite_replaces_it(full_run, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("stale")
    assert export_main(["--model", str(full_run), "--out", str(out)]) == 1
    assert capsys.readouterr().err == (
        f"error: --out {out} already holds files: pick an empty or new folder, or pass --overwrite to replace it.\n"
    )
    assert export_main(["--model", str(full_run), "--out", str(out), "--overwrite", "--dtype", "float32"]) == 0
    assert not (out / "old.txt").exists()


def test_an_unknown_dtype_is_a_usage_error(full_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export_main(["--model", str(full_run), "--out", str(tmp_path / "x"), "--dtype", "int8"])
    assert exit_.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err
