"""Loading a finished run for inference (full or LoRA, its base found or named), asking it questions, and
the questions file and answers file of ``python -m phi3v.predict``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from phi3v import Phi3VForCausalLM, Phi3VProcessor
from phi3v import inference as inference_module
from phi3v.errors import RecipeError
from phi3v.inference import Trained, ask, load_trained, read_questions, run_base_model, write_answers
from tests.conftest import noise_image

PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


def copy_model(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def write_json(path: Path, content) -> Path:
    path.write_text(json.dumps(content))
    return path


@pytest.fixture(scope="module")
def lora_dir(tiny_dir, tmp_path_factory) -> Path:
    """What a LoRA run leaves in --output_dir: the adapters (naming the tiny checkpoint) and the processor."""
    torch.manual_seed(5)
    base = Phi3VForCausalLM.from_pretrained(tiny_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("lora_run")
    get_peft_model(base, config).save_pretrained(folder)
    for name in PROCESSOR_FILES:
        shutil.copyfile(tiny_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def trained(tiny_dir) -> Trained:
    return load_trained(tiny_dir, device="cpu")


# --- the base model of a run -----------------------------------------------------------------------------------


def test_run_base_model_from_the_adapter_config_or_run_args(tmp_path):
    assert run_base_model(tmp_path) is None
    write_json(tmp_path / "run_args.json", {"flags": {"model_name_or_path": "/models/from_run_args"}})
    assert run_base_model(tmp_path) == "/models/from_run_args"
    write_json(tmp_path / "adapter_config.json", {"base_model_name_or_path": "/models/from_adapters"})
    assert run_base_model(tmp_path) == "/models/from_adapters"  # the adapters say what they apply to
    write_json(tmp_path / "adapter_config.json", {"r": 4})
    assert run_base_model(tmp_path) is None
    (tmp_path / "adapter_config.json").unlink()
    write_json(tmp_path / "run_args.json", {"command": "x"})
    assert run_base_model(tmp_path) is None


# --- load_trained ------------------------------------------------------------------------------------------------


def test_a_full_model_folder_loads_as_it_is(trained, tiny_dir, tiny_model):
    assert trained.kind == "full" and trained.base is None
    assert type(trained.model) is Phi3VForCausalLM and not trained.model.training
    weight = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(trained.model.state_dict()[weight], tiny_model.state_dict()[weight])
    assert isinstance(trained.processor, Phi3VProcessor) and trained.processor.image_processor.num_crops == 4


def test_a_full_run_records_its_base_and_takes_num_crops_and_dtype(tiny_dir, tmp_path):
    run = copy_model(tiny_dir, tmp_path / "run")
    write_json(run / "run_args.json", {"flags": {"model_name_or_path": "microsoft/Phi-3.5-vision-instruct"}})
    loaded = load_trained(run, dtype=torch.bfloat16, device="cpu", num_crops=2)
    assert (loaded.kind, loaded.base) == ("full", "microsoft/Phi-3.5-vision-instruct")
    assert loaded.processor.image_processor.num_crops == 2
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_a_lora_run_loads_its_base_with_the_adapters(lora_dir, tiny_dir, tiny_model):
    loaded = load_trained(lora_dir, device="cpu")
    assert (loaded.kind, loaded.base) == ("lora", str(tiny_dir))
    assert isinstance(loaded.model, PeftModel) and not loaded.model.training
    inputs = loaded.processor("<|user|>\nHello<|end|>\n<|assistant|>\n")
    with torch.no_grad():
        difference = (loaded.model(**inputs).logits - tiny_model(**inputs).logits).abs().max()
    assert difference > 1e-3  # the adapters are applied


def test_a_folder_with_neither_config_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="holds neither adapter_config.json .LoRA. nor config.json"):
        load_trained(tmp_path)


def test_a_missing_model_folder(tmp_path):
    with pytest.raises(RecipeError) as raised:
        load_trained(tmp_path / "gone")
    assert str(raised.value) == f"--model {tmp_path / 'gone'}: no such folder."


def lora_copy(lora_dir: Path, folder: Path, base, model_folder: str | None = None) -> Path:
    """The LoRA run with its adapter config naming ``base`` and, when given, run_args.json's model_folder."""
    run = copy_model(lora_dir, folder)
    config = json.loads((run / "adapter_config.json").read_text())
    write_json(run / "adapter_config.json", {**config, "base_model_name_or_path": base})
    if model_folder is not None:
        write_json(run / "run_args.json", {"flags": {"model_name_or_path": base}, "model_folder": model_folder})
    return run


def test_a_moved_base_is_named_with_the_way_out(lora_dir, tiny_dir, tmp_path):
    gone = str(tmp_path / "gone")
    run = lora_copy(lora_dir, tmp_path / "run", gone, model_folder=gone)
    with pytest.raises(RecipeError) as raised:
        load_trained(run, device="cpu")
    assert str(raised.value) == (
        f"The base model of this LoRA run, {gone} (named in {run / 'adapter_config.json'}), does not exist: it was "
        "moved or deleted. Pass --base with the folder (or hub id) of that model."
    )
    loaded = load_trained(run, base=str(tiny_dir), device="cpu")  # --base
    assert (loaded.kind, loaded.base) == ("lora", str(tiny_dir))


def test_a_missing_base_given_with_base_is_said_to_be_missing(lora_dir, tmp_path):
    with pytest.raises(RecipeError) as raised:
        load_trained(lora_dir, base=str(tmp_path / "nowhere"))
    assert str(raised.value) == f"--base {tmp_path / 'nowhere'}: no such folder."


def test_a_relative_base_is_found_where_run_args_recorded_it(lora_dir, tiny_dir, tmp_path, monkeypatch):
    run = lora_copy(lora_dir, tmp_path / "run", "models/tiny", model_folder=str(tiny_dir))
    monkeypatch.chdir(tmp_path)  # where "models/tiny" does not exist
    loaded = load_trained(run, device="cpu")
    assert (loaded.kind, loaded.base) == ("lora", str(tiny_dir))


def test_a_hub_base_goes_to_the_hub(lora_dir, tmp_path, monkeypatch):
    run = lora_copy(lora_dir, tmp_path / "run", "microsoft/Phi-3.5-vision-instruct")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError, match=r"^--base 'microsoft/Phi-3.5-vision-instruct' is not a local folder and "):
        load_trained(run, device="cpu")


def test_a_lora_run_naming_no_base_needs_base(lora_dir, tmp_path):
    run = lora_copy(lora_dir, tmp_path / "run", None)
    with pytest.raises(RecipeError, match="adapter_config.json names no base model: pass --base"):
        load_trained(run)


# --- ask ---------------------------------------------------------------------------------------------------------


def greedy_answer(trained: Trained, question: str, images: list, max_new_tokens: int) -> str:
    """generate() on the prompt the processor builds, alone (no batch, no padding)."""
    processor = trained.processor
    tags = "".join(f"<|image_{k}|>" for k in range(1, len(images) + 1))
    content = f"{tags}\n{question}" if images else question
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(prompt, images)
    with torch.no_grad():
        output = trained.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=processor.stop_token_ids,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    new = output[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0].strip()


@pytest.fixture(scope="module")
def questions() -> list[tuple[str, list]]:
    a, b = noise_image(80, 60, 1), noise_image(50, 90, 2)
    return [
        ("What colour is the shape?", [a]),
        ("Spell the word cat backwards.", []),
        ("Are the two images the same?", [a, b]),
        ("What shape is drawn?", [b]),
        ("How many shapes are there?", [a]),
    ]


def test_ask_gives_one_greedy_answer_per_question_in_order(trained, questions):
    expected = [greedy_answer(trained, question, images, 6) for question, images in questions]
    assert ask(trained, questions, max_new_tokens=6, batch_size=2) == expected
    assert ask(trained, questions[2::-1], max_new_tokens=6, batch_size=3) == expected[2::-1]
    assert len(set(expected)) > 1  # the answers depend on the question


def test_ask_a_lora_run(lora_dir, questions):
    loaded = load_trained(lora_dir, device="cpu")
    chosen = questions[1:]
    expected = [greedy_answer(loaded, question, images, 4) for question, images in chosen]
    assert ask(loaded, chosen, max_new_tokens=4, batch_size=3) == expected
    assert len(set(expected)) >= 3  # distinct enough that an answer in the wrong place shows


def test_ask_takes_image_paths(trained, questions, tmp_path):
    path = tmp_path / "a.png"
    questions[0][1][0].save(path)
    assert ask(trained, [(questions[0][0], [path])], 5) == [greedy_answer(trained, *questions[0], 5)]


# --- read_questions ----------------------------------------------------------------------------------------------


def image_folder(root: Path) -> Path:
    (root / "images" / "sub").mkdir(parents=True)
    noise_image(30, 20, 0).save(root / "images" / "a.png")
    noise_image(20, 30, 1).save(root / "images" / "sub" / "b.jpg")
    (root / "images" / "empty.png").write_bytes(b"")
    noise_image(10, 10, 2).save(root / "outside.png")
    return root / "images"


def test_read_questions_resolves_images_and_keeps_every_key(tmp_path):
    images = image_folder(tmp_path)
    file = tmp_path / "questions.jsonl"
    lines = [
        {"id": 1, "images": ["a.png"], "question": "What is it?"},
        {"id": "two", "images": ["sub/b.jpg", "a.png"], "question": "Same?", "note": "kept"},
        {"question": "No images at all?"},
    ]
    file.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n" + json.dumps(lines[2]) + "\n")
    assert read_questions(file, images) == [
        {"id": 1, "images": [str((images / "a.png").resolve())], "question": "What is it?"},
        {"id": "two", "images": [str((images / "sub" / "b.jpg").resolve()), str((images / "a.png").resolve())],
         "question": "Same?", "note": "kept"},
        {"question": "No images at all?", "images": []},
    ]  # fmt: skip


def test_read_questions_names_every_bad_line(tmp_path):
    images = image_folder(tmp_path)
    file = tmp_path / "questions.jsonl"
    raw = [
        json.dumps({"images": ["a.png"], "question": "good"}).encode(),
        b'{"images": ["a.png"], "question": "unterminated',
        json.dumps({"images": ["gone.png"], "question": "missing"}).encode(),
        json.dumps({"images": ["../outside.png"], "question": "escaping"}).encode(),
        json.dumps({"images": [str(tmp_path / "outside.png")], "question": "absolute"}).encode(),
        '{"images": [], "question": "caf\u00e9"}'.encode("latin-1"),
        json.dumps({"images": ["empty.png"], "question": "unreadable"}).encode(),
        json.dumps({"images": "a.png", "question": "not a list"}).encode(),
        json.dumps(["a list"]).encode(),
        json.dumps({"images": ["a.png"], "question": 3}).encode(),
    ]
    file.write_bytes(b"\n".join(raw) + b"\n")
    with pytest.raises(RecipeError) as raised:
        read_questions(file, images)
    problems = str(raised.value).splitlines()
    at = {int(line.split(":")[1]): line for line in problems}
    assert sorted(at) == list(range(2, 11)) and len(problems) == 9  # line 1 is good
    assert at[2].startswith(f"{file}:2: not valid JSON (")
    assert at[3] == f"{file}:3: missing images [{str((images / 'gone.png').resolve())!r}]"
    assert at[4] == f"{file}:4: images leave {images.resolve()}: ['../outside.png']"
    assert at[5] == f"{file}:5: images leave {images.resolve()}: [{str(tmp_path / 'outside.png')!r}]"
    assert at[6].startswith(f"{file}:6: not UTF-8 text (byte 0xe9 at byte ")
    assert at[7] == (
        f"{file}:7: image 1 ({(images / 'empty.png').resolve()}): not an image file PIL can read (empty, or another "
        "format): replace it."
    )
    for number in (8, 9, 10):
        assert at[number] == f'{file}:{number}: needs a string "question" and a list "images"'


@pytest.mark.parametrize("images", [[1], [None], [["a.png"]]], ids=["number", "null", "nested_list"])
def test_image_entries_that_are_not_paths_are_named_by_line(tmp_path, images):
    folder = image_folder(tmp_path)
    file = write_json(tmp_path / "q.jsonl", {"images": images, "question": "?"})
    with pytest.raises(RecipeError, match=r"q.jsonl:1: "):
        read_questions(file, folder)


def test_read_questions_of_a_missing_file(tmp_path):
    with pytest.raises(RecipeError) as raised:
        read_questions(tmp_path / "questions.jsonl", tmp_path)
    assert str(raised.value) == f"--questions {tmp_path / 'questions.jsonl'}: no such file."


def test_a_symlink_out_of_the_image_folder_is_refused(tmp_path):
    images = image_folder(tmp_path)
    (images / "link.png").symlink_to(tmp_path / "outside.png")
    file = write_json(tmp_path / "q.jsonl", {"images": ["link.png"], "question": "?"})
    with pytest.raises(RecipeError, match=r"q.jsonl:1: images leave .*\['link.png'\]"):
        read_questions(file, images)


# --- write_answers -----------------------------------------------------------------------------------------------


def test_write_answers_writes_one_line_per_question_in_order(trained, questions, tmp_path):
    paths = []
    questions = questions[:3]
    for number, (_, images) in enumerate(questions):
        paths.append([])
        for k, image in enumerate(images):
            paths[-1].append(str(tmp_path / f"{number}_{k}.png"))
            image.save(paths[-1][-1])
    items = [{"id": n, "question": q, "images": p} for n, ((q, _), p) in enumerate(zip(questions, paths))]
    answers = tmp_path / "answers.jsonl"
    write_answers(trained, items, answers, max_new_tokens=5, batch_size=2)
    written = [json.loads(line) for line in answers.read_text().splitlines()]
    expected = [greedy_answer(trained, q, images, 5) for q, images in questions]
    assert written == [{**item, "answer": answer} for item, answer in zip(items, expected)]


def test_write_answers_keeps_what_it_answered_before_an_error(trained, tmp_path, monkeypatch):
    batches = []

    def fake_ask(trained, pairs, max_new_tokens, batch_size):
        batches.append([question for question, _ in pairs])
        if len(batches) == 3:
            raise ValueError("image 1 (x.png): corrupt")
        assert (open(tmp_path / "answers.jsonl").read().count("\n")) == 2 * (len(batches) - 1)  # flushed
        return [f"answer to {question}" for question, _ in pairs]

    monkeypatch.setattr(inference_module, "ask", fake_ask)
    items = [{"id": n, "question": f"q{n}", "images": []} for n in range(6)]
    with pytest.raises(RecipeError) as raised:
        write_answers(trained, items, tmp_path / "answers.jsonl", max_new_tokens=3, batch_size=2)
    assert str(raised.value) == (
        f"image 1 (x.png): corrupt\nThe answers to the first 4 questions are in {tmp_path / 'answers.jsonl'}."
    )
    assert batches == [["q0", "q1"], ["q2", "q3"], ["q4", "q5"]]
    written = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert written == [{**item, "answer": f"answer to {item['question']}"} for item in items[:4]]


def test_write_answers_to_an_unwritable_place(trained, tmp_path):
    with pytest.raises(RecipeError, match=r"^--answers .*no_folder/answers.jsonl: cannot be written \("):
        write_answers(trained, [], tmp_path / "no_folder" / "answers.jsonl", 3, 2)
