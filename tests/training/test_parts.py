"""The parts of the model: what each freezing flag leaves trainable (full finetuning and LoRA), the learning rate of
each part in the Trainer's optimizer and schedule, DoRA and rsLoRA adapters, and the refused combinations."""

from __future__ import annotations

import json

import pytest
from peft.tuners.lora import LoraLayer

from phi3v import Phi3VForCausalLM
from phi3v.args import RecipeArguments, parse_args
from phi3v.training.parts import learning_rates, trainable_parameter_table
from phi3v.training.preparation import prepare_for_training
from phi3v.training.trainer import RecipeTrainer, build_training_args, setup_distributed
from tests.conftest import training_batch

CLIP = "model.vision_embed_tokens.img_processor."
PROJECTOR = ("model.vision_embed_tokens.img_projection.", "model.vision_embed_tokens.glb_GN",
             "model.vision_embed_tokens.sub_GN")  # fmt: skip


def kind(name: str) -> str:
    """The test's own reading of a parameter name: clip, projector or language."""
    bare = name.removeprefix("base_model.model.")
    if bare.startswith(CLIP):
        return "clip"
    return "projector" if bare.startswith(PROJECTOR) else "language"


def never_runs(name: str) -> bool:
    """CLIP's last layer (of 3 in the tiny tower) and post_layernorm: always frozen, features come from layer -2."""
    return ".encoder.layers.2." in name or "post_layernorm" in name


@pytest.fixture
def model(tiny_dir):
    return Phi3VForCausalLM.from_pretrained(tiny_dir)


def trainable_kinds(model) -> dict[str, set[str]]:
    kinds: dict[str, set[str]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            kinds.setdefault(kind(name), set()).add(name)
    return kinds


FREEZING = {  # flags -> the kinds left trainable
    "--freeze_clip": {"projector", "language"},
    "--freeze_projector": {"clip", "language"},
    "--freeze_language_model": {"clip", "projector"},
    "--freeze_vision_model": {"language"},
    "--freeze_clip --freeze_language_model": {"projector"},
    "--freeze_projector --freeze_language_model": {"clip"},
    "--freeze_clip --freeze_projector": {"language"},
}


@pytest.mark.parametrize("flags", list(FREEZING))
def test_each_freezing_flag_leaves_exactly_the_expected_parameters_trainable(model, flags):
    prepare_for_training(model, parse_args(RecipeArguments, flags.split()))
    every = {name for name, _ in model.named_parameters() if not never_runs(name)}
    expected = {name for name in every if kind(name) in FREEZING[flags]}
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == expected


@pytest.mark.parametrize("flags", list(FREEZING))
def test_with_lora_each_freezing_flag_leaves_adapters_only_where_expected(model, flags):
    peft_model = prepare_for_training(model, parse_args(RecipeArguments, ["--use_lora", "--lora_rank", "4",
                                                                          *flags.split()]))  # fmt: skip
    adapted = {kind(name) for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}
    assert adapted == FREEZING[flags]
    trainable = [name for name, parameter in peft_model.named_parameters() if parameter.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--freeze_vision_model --freeze_language_model", "freeze the whole model"),
        ("--freeze_clip --freeze_projector --freeze_language_model", "freeze the whole model"),
        ("--freeze_clip --vision_lr 1e-4", "--vision_lr is the learning rate of a part that --freeze_clip"),
        ("--freeze_vision_model --projector_lr 1e-4", "--projector_lr is the learning rate of a part"),
        ("--vision_lr 0", "--vision_lr must be more than 0"),
        ("--use_dora", "--use_dora is a kind of LoRA adapter: add --use_lora"),
        ("--use_rslora", "--use_rslora is a kind of LoRA adapter"),
    ],
)
def test_refused_before_loading(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(RecipeArguments, flags.split())
    assert message in capsys.readouterr().err


def trainer_for(model, args: RecipeArguments, tiny_processor) -> RecipeTrainer:
    setup_distributed(args)
    return RecipeTrainer(
        model=model,
        args=build_training_args(args, accumulation_steps=1),
        loss_guard=None,
        unreadable=None,
        rates=learning_rates(args),
    )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_optimizer_gives_each_part_its_learning_rate_and_the_schedule_scales_each(
    model, tiny_processor, tmp_path, lora
):
    flags = ["--output_dir", str(tmp_path), "--deepspeed", "none", "--learning_rate", "1e-3", "--vision_lr", "1e-2",
             "--projector_lr", "3e-3", "--warmup_steps", "2", "--max_steps", "10", "--wd", "0.05"]  # fmt: skip
    args = parse_args(RecipeArguments, flags + (["--use_lora", "--lora_rank", "4"] if lora else []))
    prepared = prepare_for_training(model, args)
    trainer = trainer_for(prepared, args, tiny_processor)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    wanted = {"clip": 1e-2, "projector": 3e-3, "language": 1e-3}
    decaying = set(trainer.get_decay_parameter_names(prepared))
    by_tensor = {id(p): name for name, p in prepared.named_parameters()}
    seen = set()
    for group in trainer.optimizer.param_groups:
        names = [by_tensor[id(p)] for p in group["params"]]
        assert len({kind(name) for name in names}) == 1 and len({name in decaying for name in names}) == 1
        assert group["initial_lr"] == wanted[kind(names[0])]
        assert group["weight_decay"] == (0.05 if names[0] in decaying else 0.0)
        seen.update(names)
    assert seen == {name for name, p in prepared.named_parameters() if p.requires_grad}
    assert {kind(name) for name in seen} == ({"clip", "projector", "language"})
    # the weight decay falls on the same parameters as in the Trainer's own two groups
    plain = trainer_for(prepared, parse_args(RecipeArguments, flags[:4]), tiny_processor)
    plain.create_optimizer()
    assert [len(group["params"]) for group in plain.optimizer.param_groups if group["weight_decay"]] == [
        sum(len(group["params"]) for group in trainer.optimizer.param_groups if group["weight_decay"])
    ]
    assert not [name for name in decaying if name.endswith(".bias") or "norm" in name]
    trainer.optimizer.zero_grad()
    prepared(**training_batch(tiny_processor)).loss.backward()
    for _ in range(4):  # warm-up over, 2 of 8 decay steps done: every rate at (8 - 2) / 8 = 3/4 of its peak
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * 0.75)


def test_one_learning_rate_keeps_the_trainers_own_two_groups(model, tiny_processor, tmp_path):
    """Without --vision_lr/--projector_lr the optimizer is the Trainer's (decay and no-decay), as today."""
    args = parse_args(RecipeArguments, ["--output_dir", str(tmp_path), "--deepspeed", "none"])
    trainer = trainer_for(prepare_for_training(model, args), args, tiny_processor)
    trainer.create_optimizer()
    assert len(trainer.optimizer.param_groups) == 2 and "part" not in trainer.optimizer.param_groups[0]


def test_the_table_shows_each_parts_learning_rate(model):
    args = parse_args(RecipeArguments, ["--vision_lr", "1e-2", "--projector_lr", "3e-3", "--learning_rate", "1e-3"])
    prepare_for_training(model, args)
    rows = {line[:40].strip(): line[72:].strip() for line in trainable_parameter_table(
        model, {"vision": 1e-2, "projector": 3e-3, "language": 1e-3}).splitlines()}  # fmt: skip
    assert rows["vision tower (CLIP)"] == "0.01" and rows["projector"] == "0.003"
    assert rows["separators (glb_GN, sub_GN)"] == "0.003" and rows["decoder layers"] == "0.001"


@pytest.mark.parametrize("variant", ["--use_dora", "--use_rslora"])
def test_dora_and_rslora_adapters(model, variant):
    """DoRA adds a magnitude vector per adapted layer; rsLoRA scales by alpha / sqrt(rank) instead of alpha / rank."""
    peft_model = prepare_for_training(model, parse_args(RecipeArguments, ["--use_lora", "--lora_rank", "4",
                                                                          variant]))  # fmt: skip
    layers = [module for module in peft_model.modules() if isinstance(module, LoraLayer)]
    magnitudes = [name for name, _ in peft_model.named_parameters() if "lora_magnitude_vector" in name]
    if variant == "--use_dora":
        assert len(magnitudes) == len(layers) > 0
        assert all(layer.scaling["default"] == 8 / 4 for layer in layers)
    else:
        assert not magnitudes
        assert all(layer.scaling["default"] == pytest.approx(8 / 4**0.5) for layer in layers)


def test_per_part_rates_with_a_deepspeed_optimizer_section_are_refused(tmp_path, capsys):
    """DeepSpeed builds its own optimizer from an "optimizer" section, which would drop the parts' groups."""
    config = tmp_path / "zero2_adam.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {}}}))
    with pytest.raises(SystemExit):
        parse_args(RecipeArguments, ["--deepspeed", str(config), "--vision_lr", "1e-4"])
    assert 'defines its own (an "optimizer" section)' in capsys.readouterr().err
    assert parse_args(RecipeArguments, ["--deepspeed", str(config)]).deepspeed == str(config.resolve())
    assert parse_args(RecipeArguments, ["--deepspeed", str(config), "--vision_lr", "1e-4", "--use_lora"]).use_lora
