"""Silent-failure guards: the trainable-parameter table, the non-finite loss stop, the zero-gradient warning."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from phi3v import Phi3VForCausalLM
from phi3v.args import RecipeArguments, parse_args
from phi3v.errors import RecipeError
from phi3v.training.guards import GradientWatch, LossGuard
from phi3v.training.parts import parameter_group, trainable_parameter_table
from phi3v.training.preparation import lora_target_modules, prepare_for_training


@pytest.fixture
def model(tiny_dir):
    return Phi3VForCausalLM.from_pretrained(tiny_dir)


def table_rows(table: str) -> dict[str, tuple[int, int]]:
    rows = {}
    for line in table.splitlines()[1:]:
        label, trainable, total = line[:40].strip(), line[40:56], line[56:]
        rows[label] = (int(trainable.replace(",", "")), int(total.replace(",", "")))
    return rows


def test_groups_follow_the_official_names():
    assert parameter_group(
        "model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight"
    ) == ("vision tower (CLIP)")
    assert parameter_group("model.vision_embed_tokens.glb_GN") == "separators (glb_GN, sub_GN)"
    assert parameter_group("base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.default.weight") == (
        "LoRA adapters on decoder layers"
    )
    assert parameter_group("base_model.model.lm_head.base_layer.weight") == "lm_head"


def test_the_table_counts_every_parameter_once(model):
    prepare_for_training(model, parse_args(RecipeArguments, ["--freeze_vision_model"]))
    rows = table_rows(trainable_parameter_table(model))
    assert rows["all"][1] == sum(p.numel() for p in model.parameters())
    assert rows["vision tower (CLIP)"][0] == 0 and rows["projector"][0] == 0
    assert rows["token embeddings"][0] == rows["token embeddings"][1] > 0
    assert rows["all"][0] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_rows(model):
    """Each LoRA row counts rank x (inputs + outputs) per adapted Linear of its part, all of it trainable; the
    base weights train nothing."""
    parts = {
        "decoder layers": "model.layers.",
        "vision tower (CLIP)": "model.vision_embed_tokens.img_processor.",
        "projector": "model.vision_embed_tokens.img_projection.",
        "lm_head": "lm_head",
    }
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    adapted = {name: linears[name] for name in lora_target_modules(model)}
    expected = {
        part: sum(4 * (m.in_features + m.out_features) for name, m in adapted.items() if name.startswith(prefix))
        for part, prefix in parts.items()
    }
    every_adapter = sum(4 * (m.in_features + m.out_features) for m in adapted.values())
    assert all(expected.values()) and sum(expected.values()) == every_adapter  # no adapter outside these parts
    peft_model = prepare_for_training(model, parse_args(RecipeArguments, ["--use_lora", "--lora_rank", "4"]))
    rows = table_rows(trainable_parameter_table(peft_model))
    for part, count in expected.items():
        assert rows[f"LoRA adapters on {part}"] == (count, count), part
    assert rows["decoder layers"][0] == 0 and rows["vision tower (CLIP)"][0] == 0 and rows["lm_head"][0] == 0
    assert rows["all"][0] == every_adapter


def test_nothing_trainable_is_refused(model):
    model.requires_grad_(False)
    with pytest.raises(RecipeError, match="No parameter of the model is trainable"):
        trainable_parameter_table(model)


def step_end(callback, step: int):
    state = TrainerState()
    state.global_step = step
    return callback.on_step_end(TrainingArguments(output_dir="unused", report_to="none"), state, TrainerControl())


def test_three_nonfinite_steps_in_a_row_stop_the_run_naming_steps_and_samples():
    guard = LossGuard(describe_row=lambda row: f"data.jsonl:{row + 1}")
    guard.observe(torch.tensor(float("nan")), [0])
    step_end(guard, 1)
    guard.observe(torch.tensor(1.5), [1])
    step_end(guard, 2)  # a finite step resets the count
    for step, rows in ((3, [2, 3]), (4, [4]), (5, [5])):
        guard.observe(torch.tensor(1.0), rows[:1])  # one finite micro-batch does not save the step
        guard.observe(torch.tensor(float("inf")), rows)
        if step < 5:
            step_end(guard, step)
    with pytest.raises(RecipeError) as error:
        step_end(guard, 5)
    message = str(error.value)
    assert "not finite (nan or inf) at optimizer steps 3, 4, 5" in message
    assert "data.jsonl:3\n  data.jsonl:4\n  data.jsonl:5\n  data.jsonl:6" in message
    assert "data.jsonl:1" not in message and "data.jsonl:2\n" not in message


def test_zero_gradients_are_reported_per_group(model, tiny_processor, caplog):
    """A text-only batch gives the vision parts an exactly-zero gradient: the watch says so, once."""
    model.train()
    prepare_for_training(model, parse_args(RecipeArguments, []))
    watch = GradientWatch(model, steps=2)
    prompt = tiny_processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = tiny_processor(prompt)["input_ids"]
    for step in (1, 2):
        model(input_ids=ids, labels=ids).loss.backward()
        with caplog.at_level("WARNING"):
            step_end(watch, step)
    warned = [r.getMessage() for r in caplog.records if "exactly zero" in r.getMessage()]
    assert {w.split(" was exactly zero")[0].removeprefix("The gradient of ") for w in warned} == {
        "vision tower (CLIP)",
        "projector",
        "separators (glb_GN, sub_GN)",
    }
    assert not watch.hooks  # removed after the watch: no cost later on
