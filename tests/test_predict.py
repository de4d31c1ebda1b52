"""``python -m phi3v.predict`` on the tiny checkpoint: one question, a questions file, and the errors that
come before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import phi3v.predict as predict_module
from phi3v.errors import RecipeError
from phi3v.inference import ask, load_trained
from phi3v.predict import main as predict
from tests.conftest import noise_image


def noise_png(path: Path, width: int, height: int, seed: int) -> Path:
    noise_image(width, height, seed).save(path)
    return path


@pytest.fixture(scope="module")
def trained(tiny_dir):
    return load_trained(tiny_dir, device="cpu")


@pytest.fixture
def images(tmp_path) -> list[Path]:
    return [noise_png(tmp_path / "a.png", 80, 60, 1), noise_png(tmp_path / "b.jpg", 40, 90, 2)]


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if predict gets as far as loading the model."""

    def load_trained(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(predict_module, "load_trained", load_trained)


def test_one_question_prints_one_answer(tiny_dir, trained, images, capsys):
    arguments = ["--model", str(tiny_dir), "--question", "What is shown?", "--max_new_tokens", "5", "--device", "cpu"]
    assert predict([*arguments, "--image", str(images[0]), "--image", str(images[1])]) == 0
    printed = capsys.readouterr().out
    assert printed == ask(trained, [("What is shown?", images)], 5)[0] + "\n"
    assert predict([*arguments, "--image", str(images[1]), str(images[0])]) == 0  # --image b a: in that order
    assert capsys.readouterr().out == ask(trained, [("What is shown?", images[::-1])], 5)[0] + "\n"


def test_a_questions_file_gets_one_answer_line_per_question_in_order(tiny_dir, trained, images, tmp_path, capsys):
    questions = [
        {"id": "q0", "images": ["a.png"], "question": "What colour is the shape?"},
        {"id": "q1", "images": [], "question": "Spell cat backwards."},
        {"id": "q2", "images": ["b.jpg", "a.png"], "question": "Are they the same?", "extra": [1, 2]},
    ]
    file = tmp_path / "questions.jsonl"
    file.write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = tmp_path / "answers.jsonl"
    arguments = ["--model", str(tiny_dir), "--questions", str(file), "--answers", str(answers)]
    assert predict([*arguments, "--max_new_tokens", "4", "--batch_size", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"3 answers written to {answers}"
    written = [json.loads(line) for line in answers.read_text().splitlines()]
    resolved = [[str((tmp_path / name).resolve()) for name in q["images"]] for q in questions]
    expected = ask(trained, [(q["question"], paths) for q, paths in zip(questions, resolved)], 4)
    assert written == [
        {**q, "images": paths, "answer": answer} for q, paths, answer in zip(questions, resolved, expected)
    ]


def test_image_dir_is_where_the_questions_images_are(tiny_dir, images, tmp_path, capsys):
    (tmp_path / "questions").mkdir()
    file = tmp_path / "questions" / "q.jsonl"
    file.write_text(json.dumps({"images": ["a.png"], "question": "?"}) + "\n")
    arguments = ["--model", str(tiny_dir), "--questions", str(file), "--answers", str(tmp_path / "out.jsonl")]
    assert predict([*arguments, "--max_new_tokens", "2"]) == 1  # the file's folder by default: no a.png there
    assert "missing images" in capsys.readouterr().err
    assert predict([*arguments, "--max_new_tokens", "2", "--image_dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "out.jsonl").read_text())["images"] == [str(images[0].resolve())]


def test_a_bad_image_stops_before_the_model_loads(no_model, images, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(images[0].read_bytes()[:200])
    arguments = ["--model", str(tmp_path), "--question", "?", "--image", str(images[0])]
    assert predict([*arguments, "--image", str(tmp_path / "broken.png"), "--image", str(tmp_path / "gone.png")]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[0].startswith(f"error: image 2 ({tmp_path / 'broken.png'}): corrupt or truncated image data")
    assert lines[1] == f"image 3 ({tmp_path / 'gone.png'}): {tmp_path / 'gone.png'} does not exist."
    assert len(lines) == 2 and captured.out == ""


def test_a_bad_questions_file_stops_before_the_model_loads(no_model, tmp_path, capsys):
    file = tmp_path / "questions.jsonl"
    file.write_text('{"images": [], "question": "fine"}\n{"images": [], "question": \n')
    answers = tmp_path / "answers.jsonl"
    assert predict(["--model", str(tmp_path), "--questions", str(file), "--answers", str(answers)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {file}:2: not valid JSON (")
    assert not answers.exists()


def test_an_image_tag_in_the_question_is_an_error_line(tiny_dir, images, capsys):
    arguments = ["--model", str(tiny_dir), "--question", "What is in <|image_1|>?", "--image", str(images[0])]
    assert predict([*arguments, "--max_new_tokens", "2", "--device", "cpu"]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_a_missing_model_folder(tmp_path, images, capsys):
    missing = tmp_path / "no" / "model"
    assert predict(["--model", str(missing), "--question", "?", "--image", str(images[0])]) == 1
    assert capsys.readouterr().err == f"error: --model {missing}: no such folder.\n"


def test_the_flags_reach_the_loader(images, monkeypatch, tmp_path):
    asked = []

    def load_trained(*args):
        asked.append(args)
        raise RecipeError("stop here")

    monkeypatch.setattr(predict_module, "load_trained", load_trained)
    arguments = ["--model", "run", "--base", "base", "--question", "?", "--image", str(images[0])]
    assert predict([*arguments, "--dtype", "bfloat16", "--device", "cpu", "--num_crops", "2"]) == 1
    assert predict(["--model", "run", "--question", "?"]) == 1  # a question without images is fine
    assert asked == [("run", "base", torch.bfloat16, "cpu", 2), ("run", None, torch.float32, None, None)]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model", "m"], "give either --question (with --image) or --questions (with --answers)"),
        (["--model", "m", "--question", "?", "--questions", "q.jsonl"], "give either --question"),
        (["--model", "m", "--questions", "q.jsonl"], "--questions needs --answers"),
        (["--question", "?"], "the following arguments are required: --model"),
    ],
    ids=["neither", "both", "no_answers", "no_model"],
)
def test_flag_mistakes_are_usage_errors(arguments, message, no_model, capsys):
    with pytest.raises(SystemExit) as raised:
        predict(arguments)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err
