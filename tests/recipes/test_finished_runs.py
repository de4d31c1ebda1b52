"""From a finished run to a model in use: export, predict, the run report, sweeps, your own data."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import phi3v.inference as inference_module
from phi3v import Phi3VForCausalLM
from phi3v.data.synthetic import shape_image, write_custom, write_docvqa
from phi3v.errors import RecipeError
from phi3v.exporting import export
from phi3v.inference import ask as ask_model
from phi3v.inference import load_trained
from phi3v.predict import main as predict
from phi3v.runs import main as runs_table
from tests.conftest import mounted_small_disk, reference_file
from tests.recipes.conftest import launch

DOCVQA = "finetune_hf_trainer_docvqa.py"
MODES = {
    "lora": ["--use_lora", "--lora_rank", "4", "--report_to", "tensorboard"],
    "qlora": ["--use_qlora", "--lora_rank", "4"],
    "full": ["--deepspeed", "none"],
}


def run_flags(tiny_dir: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(tiny_dir), "--dataset_name_or_path", str(data), "--output_dir", str(output_dir),
        "--num_crops", "1", "--batch_size", "2", "--max_steps", "3", "--logging_steps", "1", "--warmup_steps", "0",
        "--learning_rate", "1e-3", "--max_eval_samples", "2", "--max_new_tokens", "3", "--no-tqdm", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def docvqa(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("finished") / "docvqa"
    write_docvqa(folder, num_train=8, num_test=2)
    return folder


@pytest.fixture(scope="module")
def finished(tiny_dir, docvqa, tmp_path_factory) -> dict[str, Path]:
    """One finished tiny run per kind: LoRA (with TensorBoard), QLoRA, full finetuning."""
    runs = {}
    for kind, flags in MODES.items():
        runs[kind] = tmp_path_factory.mktemp(kind)
        launch(DOCVQA, run_flags(tiny_dir, docvqa, runs[kind], *flags))
    return runs


def names_and_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    found = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as tensors:
            found |= {name: tuple(tensors.get_slice(name).get_shape()) for name in tensors.keys()}
    return found


def as_pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", name)


@pytest.mark.parametrize("kind", list(MODES))
def test_export_writes_the_official_layout(kind, finished, tiny_dir, tmp_path, capsys):
    out = tmp_path / "export"
    difference = export(finished[kind], out, dtype="float32")
    assert difference < 1e-4
    assert "Largest logit difference from the run" in capsys.readouterr().out
    exported = names_and_shapes(out)
    assert exported == names_and_shapes(tiny_dir)  # the base checkpoint's official names and shapes
    assert not [name for name in exported if re.search("lora|base_layer|absmax|quant", name)]
    official = reference_file("phi35v_checkpoint_layout.json")
    if (
        official is not None and official.is_file()
    ):  # every name follows the official naming pattern (the tiny model has fewer layers)
        patterns = {as_pattern(name) for name in json.loads(official.read_text())["parameters"]}
        assert {as_pattern(name) for name in exported} == patterns
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(exported) and set(index["weight_map"].values()) == {
        "model-00001-of-00001.safetensors"
    }
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["torch_dtype"]) == (
        "phi3_v",
        ["Phi3VForCausalLM"],
        "float32",
    )
    assert config["rope_scaling"]["type"] == "su" and "rope_parameters" not in config
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_phi3_v.Phi3VForCausalLM"
    official_config = reference_file("phi35v_official/config.json")
    if official_config is not None and official_config.is_file():
        reference = json.loads(official_config.read_text())
        assert set(config) == set(reference) - {"_name_or_path", "_attn_implementation"}
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["num_crops"] == 1 and "auto_map" in processor  # the crops the run trained with
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"
    model = Phi3VForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32


def test_a_bfloat16_export(finished, tmp_path):
    out = tmp_path / "export"
    assert export(finished["lora"], out) < 0.05  # bf16 rounding of the weights
    with safe_open(next(out.glob("model-*.safetensors")), "pt") as tensors:
        assert tensors.get_tensor("lm_head.weight").dtype == torch.bfloat16


def test_export_never_overwrites_the_run_its_base_or_a_folder_in_use(finished, tiny_dir, tmp_path):
    run = finished["lora"]
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    for out in (run, run / "export", tiny_dir, tiny_dir / "sub", run.parent):  # the run, its base, inside, above
        with pytest.raises(RecipeError, match="would overwrite"):
            export(run, out)
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before
    used = tmp_path / "used"
    used.mkdir()
    (used / "config.json").write_text("mine")
    (used / "model-00001-of-00002.safetensors").write_bytes(b"a foreign shard")
    with pytest.raises(RecipeError, match=r"already holds files.*--overwrite"):
        export(run, used)
    assert (used / "config.json").read_text() == "mine"
    export(run, used, overwrite=True, dtype="float32")
    assert not (used / "model-00001-of-00002.safetensors").exists()  # replaced, not mixed with the new files
    assert json.loads((used / "config.json").read_text())["model_type"] == "phi3_v"
    assert not list(tmp_path.glob(".used.partial-*"))  # the temporary folder became --out


def test_an_interrupted_export_leaves_no_half_written_folder(finished, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr("phi3v.exporting._write_processor_files", fail)  # after the weights were written
    with pytest.raises(RuntimeError, match="interrupted"):
        export(finished["lora"], tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_an_export_that_does_not_fit_on_its_disk_is_refused_before_writing(finished, tmp_path):
    """The float32 tiny export (1.34 MB of weights, 1.4 MB in all) on a real 1 MB disk, which would hold the
    rest: refused up front with what it needs and what is free, nothing written."""
    with mounted_small_disk(tmp_path / "disk", "1m") as disk:
        with pytest.raises(RecipeError) as refused:
            export(finished["lora"], disk / "export", dtype="float32")
        assert list(disk.iterdir()) == []
    needs, free = re.search(r"The export needs ([\d.]+) MB and the disk holding --out \S+ has ([\d.]+) MB free",
                            str(refused.value)).groups()  # fmt: skip
    assert float(free) <= 1.1 < 1.34 < float(needs)
    assert "another disk" in str(refused.value)


def test_a_disk_that_fills_while_an_export_is_written_ends_it_with_a_message(finished, tmp_path, monkeypatch):
    """The up-front check skipped: the weights meet a real full disk (safetensors' own error type) and the export
    ends with our message, leaving nothing behind."""
    monkeypatch.setattr("phi3v.exporting._require_space", lambda *args: None)
    with mounted_small_disk(tmp_path / "disk", "1m") as disk:
        with pytest.raises(RecipeError, match=r"The disk holding --out \S+ filled up .*No space left on device"):
            export(finished["lora"], disk / "export", dtype="float32")
        assert list(disk.iterdir()) == []


def moved_base_run(finished: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the LoRA run whose base model folder is gone (moved after training)."""
    run = tmp_path / "run"
    shutil.copytree(finished["lora"], run)
    for name, key in (("adapter_config.json", "base_model_name_or_path"), ("run_args.json", "model_folder")):
        record = json.loads((run / name).read_text())
        (run / name).write_text(json.dumps({**record, key: str(tmp_path / "gone")}))
    return run


def test_a_moved_base_model_is_named_with_the_way_out(finished, tiny_dir, tmp_path, capsys):
    run = moved_base_run(finished, tmp_path)
    with pytest.raises(RecipeError, match=r"does not exist: it was moved or deleted. Pass --base"):
        export(run, tmp_path / "export")
    assert predict(["--model", str(run), "--question", "Hi", "--max_new_tokens", "2"]) == 1
    assert f"The base model of this LoRA run, {tmp_path / 'gone'}" in capsys.readouterr().err
    assert predict(["--model", str(run), "--base", str(tiny_dir), "--question", "Hi", "--max_new_tokens", "2"]) == 0


def ask(model: Path, *images: Path) -> list[str]:
    arguments = ["--model", str(model), "--question", "What colour is the shape?", "--max_new_tokens", "4"]
    for image in images:
        arguments += ["--image", str(image)]
    return arguments


@pytest.mark.parametrize("kind", list(MODES))
def test_predict_answers_from_every_kind_of_folder(kind, finished, tmp_path, capsys):
    images = [tmp_path / "a.png", tmp_path / "b.png"]
    shape_image("red", "circle", "cat").save(images[0])
    shape_image("blue", "square", "dog", size=(240, 100)).save(images[1])
    exported = tmp_path / "export"
    export(finished[kind], exported, dtype="float32")
    capsys.readouterr()
    answers = {}
    for folder, count in [(finished[kind], 1), (finished[kind], 2), (exported, 1), (exported, 2)]:
        assert predict(ask(folder, *images[:count])) == 0
        answers[folder, count] = capsys.readouterr().out.strip()
    # the export answers as the run does (for LoRA: the adapters merged, against them applied on the base)
    assert answers[exported, 1] == answers[finished[kind], 1] and answers[exported, 2] == answers[finished[kind], 2]


def test_predict_batches_a_questions_file(finished, tmp_path, capsys):
    Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
    questions = [
        {"id": "q1", "images": ["red.png"], "question": "Colour?"},
        {"id": "q2", "images": [], "question": "Hi"},
    ]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    arguments = ["--model", str(finished["full"]), "--questions", str(tmp_path / "questions.jsonl")]
    assert predict([*arguments, "--answers", str(tmp_path / "answers.jsonl"), "--batch_size", "2"]) == 0
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == ["q1", "q2"]
    red = str((tmp_path / "red.png").resolve())
    assert [(a["question"], a["images"]) for a in answers] == [("Colour?", [red]), ("Hi", [])]  # images resolved
    # the answers of the run's model to the same questions, asked here: one batch of two, as --batch_size 2
    trained = load_trained(finished["full"])  # as predict loads it: float32, a GPU if there is one
    expected = ask_model(trained, [("Colour?", [red]), ("Hi", [])], max_new_tokens=64, batch_size=2)
    assert any(expected), f"the run's model answers nothing to either question, so this test cannot tell: {expected}"
    assert [a["answer"] for a in answers] == expected
    # one question on the command line: predict prints the model's answer
    capsys.readouterr()
    assert predict(["--model", str(finished["full"]), "--question", "Colour?", "--image", red]) == 0
    alone = ask_model(trained, [("Colour?", [red])], max_new_tokens=64)[0]
    assert alone, "the run's model answers nothing to this question, so this test cannot tell"
    assert capsys.readouterr().out == alone + "\n"
    (tmp_path / "bad.jsonl").write_text('{"images": ["../outside.png"], "question": "?"}\n')
    assert (
        predict(["--model", str(finished["full"]), "--questions", str(tmp_path / "bad.jsonl"), "--answers", "x"]) == 1
    )


def test_predict_checks_every_image_before_the_model_loads(tmp_path, capsys):
    Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
    (tmp_path / "notes.png").write_text("not a picture")
    questions = [{"images": ["red.png"], "question": "Colour?"}, {"images": ["red.png", "notes.png"], "question": "?"}]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    arguments = ["--questions", str(tmp_path / "questions.jsonl"), "--answers", str(tmp_path / "answers.jsonl")]
    assert predict(["--model", str(tmp_path / "no-model-here"), *arguments]) == 1  # the model is never opened
    error = capsys.readouterr().err
    assert f"{tmp_path / 'questions.jsonl'}:2: image 2 ({tmp_path / 'notes.png'}): not an image file" in error
    assert not (tmp_path / "answers.jsonl").exists()


def test_predict_keeps_the_answers_it_computed_before_an_error(finished, tmp_path, monkeypatch, capsys):
    Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
    questions = [{"id": f"q{k}", "images": ["red.png"], "question": "Colour?"} for k in range(3)]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    real_ask, calls = inference_module.ask, []

    def ask_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third batch: the image changed on disk since it was checked, say
            raise RecipeError("Evaluation sample questions row 0: image 1 (red.png): corrupt or truncated image data")
        return real_ask(*args, **kwargs)

    monkeypatch.setattr(inference_module, "ask", ask_then_fail)  # what write_answers calls
    arguments = ["--model", str(finished["full"]), "--questions", str(tmp_path / "questions.jsonl")]
    assert predict([*arguments, "--answers", str(tmp_path / "answers.jsonl"), "--batch_size", "1"]) == 1
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [answer["id"] for answer in answers] == ["q0", "q1"]
    assert f"The answers to the first 2 questions are in {tmp_path / 'answers.jsonl'}" in capsys.readouterr().err


def test_every_run_reports_what_it_did(finished):
    for kind, run in finished.items():
        metrics = json.loads((run / "metrics.json").read_text())
        assert [step["step"] for step in metrics["steps"]] == [1, 2, 3]  # --logging_steps 1, --max_steps 3
        assert all(step["loss"] > 0 and step["learning_rate"] is not None for step in metrics["steps"])
        assert metrics["metric"] == "anls" and {"before", "after", "train_images_per_second"} <= set(metrics)
        with Image.open(run / "training_report.png") as report:
            assert report.format == "PNG" and report.width > 500
        run_args = json.loads((run / "run_args.json").read_text())
        assert run_args["flags"]["max_steps"] == 3 and run_args["versions"]["phi3v"]
        assert DOCVQA in run_args["command"]
        assert bool(list(run.glob("runs/*/events.out.tfevents.*"))) == (kind == "lora")  # --report_to tensorboard


def test_the_runs_table_shows_what_differs(tiny_dir, docvqa, tmp_path, capsys):
    for rate in ("1e-4", "1e-3", "1e-2"):
        launch(DOCVQA, run_flags(tiny_dir, docvqa, tmp_path / f"lr{rate}", *MODES["lora"][:3], "--learning_rate", rate))
    assert runs_table([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["run", "learning_rate"] and "anls after" in lines[0]
    assert {line.split()[1] for line in lines[2:]} == {"0.0001", "0.001", "0.01"}
    assert runs_table([str(tmp_path), "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("run,learning_rate,anls before,anls after,final loss")


def test_the_custom_script_trains_on_both_formats(tiny_dir, tmp_path):
    """Multi-turn, multi-image and text-only samples, in the cookbook's jsonl and as LLaVA JSON: the same
    samples give the same training."""
    write_custom(tmp_path / "data", num_train=10, num_eval=5)
    losses = {}
    for extension in ("jsonl", "json"):
        output_dir = tmp_path / extension
        flags = ["--model_name_or_path", str(tiny_dir), "--output_dir", str(output_dir), "--metric", "anls"]
        flags += ["--train_file", str(tmp_path / "data" / f"train.{extension}"), "--eval_file"]
        flags += [str(tmp_path / "data" / f"eval.{extension}"), "--use_lora", "--lora_rank", "4", "--num_crops", "1"]
        flags += ["--batch_size", "2", "--max_steps", "5", "--logging_steps", "1", "--max_new_tokens", "3", "--no-tqdm"]
        launch("finetune_hf_trainer_custom.py", flags)
        evaluation = json.loads((output_dir / "eval_after.json").read_text())
        assert evaluation["num_samples"] == 5 and "anls" in evaluation
        losses[extension] = [step["loss"] for step in json.loads((output_dir / "metrics.json").read_text())["steps"]]
    assert losses["jsonl"] == losses["json"] and len(losses["json"]) == 5


def test_the_same_seed_gives_the_same_run(tiny_dir, docvqa, tmp_path):
    """The demo's path (full finetuning on DeepSpeed ZeRO-2, dataloader workers) twice: the same answers."""
    for name in ("first", "second"):
        launch(DOCVQA, run_flags(tiny_dir, docvqa, tmp_path / name, "--seed", "3", "--dataloader_num_workers", "2"))
    first, second = (json.loads((tmp_path / n / "eval_after.json").read_text()) for n in ("first", "second"))
    assert first == second
    steps = [json.loads((tmp_path / n / "metrics.json").read_text())["steps"] for n in ("first", "second")]
    assert steps[0] == steps[1]
