"""Preparing the model for training: LoRA targets, what is frozen, and activation checkpointing recomputing what
it says and giving the same loss and gradients."""

import pytest
import torch

from phi3v import Phi3VForCausalLM
from phi3v.args import RecipeArguments, parse_args
from phi3v.training.preparation import base_model, lora_target_modules, prepare_for_training
from tests.conftest import loss_and_gradients

VISION = "model.vision_embed_tokens."


@pytest.fixture
def model(tiny_dir):
    return Phi3VForCausalLM.from_pretrained(tiny_dir)


def test_lora_targets(model):
    names = lora_target_modules(model)
    suffixes = {name.rsplit(".", 1)[-1] for name in names}
    assert {
        "qkv_proj",
        "o_proj",
        "gate_up_proj",
        "down_proj",
        "lm_head",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "fc1",
        "fc2",
    } <= suffixes
    assert VISION + "img_projection.0" in names and VISION + "img_projection.2" in names
    # CLIP's last layer never runs: no adapter there (DDP would find it unused)
    assert not [n for n in names if ".encoder.layers.2." in n]
    assert [n for n in names if ".encoder.layers.1.self_attn.q_proj" in n]
    # the text decoder has 2 layers x 4 targets + lm_head
    assert len([n for n in names if not n.startswith(VISION)]) == 2 * 4 + 1
    assert not [n for n in lora_target_modules(model, {"language"}) if n.startswith(VISION)]


def test_full_finetune_freezes_only_what_never_runs(model):
    prepare_for_training(model, parse_args(RecipeArguments, []))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".encoder.layers.2." in n or "post_layernorm" in n for n in frozen)


def test_freeze_vision_model_keeps_token_embeddings_trainable(model):
    prepare_for_training(model, parse_args(RecipeArguments, ["--freeze_vision_model"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not [n for n in trainable if n.startswith(VISION)]
    assert "model.embed_tokens.weight" in trainable and "lm_head.weight" in trainable


def test_lora_trains_only_adapters(model):
    peft_model = prepare_for_training(model, parse_args(RecipeArguments, ["--use_lora", "--lora_rank", "4"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.init_lora_weights) == (4, 8, 0.0, "gaussian")


def checkpointed_layers(model) -> dict[str, bool]:
    base = base_model(model)
    layers = {
        "decoder": base.model.layers,
        "clip": base.model.vision_embed_tokens.img_processor.vision_model.encoder.layers,
    }
    return {part: all(layer.gradient_checkpointing for layer in group) for part, group in layers.items()} | {
        f"any {part}": any(layer.gradient_checkpointing for layer in group) for part, group in layers.items()
    }


@pytest.mark.parametrize("which, expected", [
    ("true", {"decoder": True, "clip": True}),
    ("decoder", {"decoder": True, "clip": False, "any clip": False}),
    ("false", {"any decoder": False, "any clip": False}),
])  # fmt: skip
def test_gradient_checkpointing_choices_recompute_what_they_say(tiny_dir, which, expected):
    model = prepare_for_training(
        Phi3VForCausalLM.from_pretrained(tiny_dir), parse_args(RecipeArguments, ["--gradient_checkpointing", which])
    )
    found = checkpointed_layers(model)
    assert {key: found[key] for key in expected} == expected


@pytest.mark.parametrize("mode", [[], ["--use_lora", "--lora_rank", "4"]], ids=["full", "lora"])
def test_gradient_checkpointing_choices_give_the_same_loss_and_gradients(tiny_dir, tiny_processor, mode):
    reference_loss, reference = loss_and_gradients(
        tiny_dir, tiny_processor, [*mode, "--gradient_checkpointing", "false"]
    )
    assert all(grad is not None for grad in reference.values())
    for which in ("true", "decoder"):
        loss, gradients = loss_and_gradients(tiny_dir, tiny_processor, [*mode, "--gradient_checkpointing", which])
        torch.testing.assert_close(loss, reference_loss, rtol=0, atol=0)
        for name, grad in gradients.items():
            torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-7, msg=f"{which}: {name}")
