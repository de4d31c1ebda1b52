"""The error policy at every entry point: a path that does not exist is one `error:` line, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from phi3v.errors import RecipeError, command
from tests.conftest import REPO

RECIPE_FLAGS = "--num_crops 1 --max_steps 1 --max_eval_samples 1 --dataloader_num_workers 0 --no_tqdm".split()


def entry_points(missing: str, tiny: str, output: str) -> dict[str, list[str]]:
    """Each program, pointed at the folder ``missing`` (which does not exist) where it reads its input."""
    recipe = [*RECIPE_FLAGS, "--model_name_or_path", tiny, "--output_dir", output]
    python = sys.executable
    return {
        "docvqa": [python, "finetune_hf_trainer_docvqa.py", *recipe, "--dataset_name_or_path", missing],
        "hateful_memes": [python, "finetune_hf_trainer_hateful_memes.py", *recipe, "--dataset_name_or_path", missing],
        "nlvr2": [python, "finetune_hf_trainer_nlvr2.py", *recipe, "--dataset_name_or_path", missing],
        "ucf101": [python, "finetune_hf_trainer_ucf101.py", *recipe, "--data_dir", missing],
        "custom": [
            python,
            "finetune_hf_trainer_custom.py",
            *recipe,
            "--train_file",
            f"{missing}/train.jsonl",
            "--eval_file",
            f"{missing}/eval.jsonl",
        ],  # fmt: skip
        "convert_ucf101": [python, "convert_ucf101.py", "--video_dir", missing, "--out_dir", output],
        "export": [python, "-m", "phi3v.export", "--model", missing, "--out", output],
        "predict": [python, "-m", "phi3v.predict", "--model", missing, "--question", "What?"],
        "validate": [
            python,
            "-m",
            "phi3v.validate",
            "docvqa",
            "--model_name_or_path",
            tiny,
            "--dataset_name_or_path",
            missing,
        ],  # fmt: skip
        "runs": [python, "-m", "phi3v.runs", missing],
    }


def test_every_entry_point_reports_a_missing_folder_in_one_error_line(tiny_dir, tmp_path):
    missing = str(tmp_path / "no" / "such" / "folder")
    commands = entry_points(missing, str(tiny_dir), str(tmp_path / "out"))
    # all at once: each spends most of its time importing torch and transformers
    running = {
        name: subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, command in commands.items()
    }
    for name, process in running.items():
        output, _ = process.communicate(timeout=300)
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert process.returncode != 0, (name, output)
        assert "Traceback" not in output, (name, output)
        assert len(errors) == 1 and "no such f" in errors[0] and "no/such/folder" in errors[0], (name, output)


def test_a_recipe_error_is_a_message_and_status_1_other_errors_keep_their_traceback(capsys):
    @command
    def user_problem() -> int:
        raise RecipeError("--thing x: no such folder.")

    @command
    def bug() -> int:
        raise KeyError("a bug")

    assert user_problem() == 1
    assert capsys.readouterr().err == "error: --thing x: no such folder.\n"
    with pytest.raises(KeyError):
        bug()
