"""Training setup: LoRA targets, freezing, and the original's TrainingArguments."""

import pytest

from phi3v import Phi3VForCausalLM
from phi3v.args import RecipeArguments, parse_args
from phi3v.training import build_training_args, lora_target_modules, prepare_for_training, setup_distributed

VISION = "model.vision_embed_tokens."


@pytest.fixture
def model(tiny_dir):
    return Phi3VForCausalLM.from_pretrained(tiny_dir)


def test_lora_targets(model):
    names = lora_target_modules(model, include_vision=True)
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
    assert not [n for n in lora_target_modules(model, include_vision=False) if n.startswith(VISION)]


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


def test_training_arguments_keep_the_original_values(tmp_path):
    args = parse_args(RecipeArguments, ["--output_dir", str(tmp_path), "--deepspeed", "none"])
    setup_distributed(args)
    training = build_training_args(args, accumulation_steps=4)
    assert (training.adam_beta1, training.adam_beta2, training.adam_epsilon) == (0.9, 0.95, 1e-7)
    assert (training.learning_rate, training.weight_decay, training.max_grad_norm) == (4e-5, 0.01, 1.0)
    assert (training.warmup_steps, training.logging_steps, training.gradient_accumulation_steps) == (50, 10, 4)
    assert training.lr_scheduler_type == "linear" and training.optim == "adamw_torch"
    assert training.save_strategy == "no" and training.remove_unused_columns is False
    assert training.ddp_find_unused_parameters is False
    assert training.activation_checkpointing and training.activation_checkpointing_kwargs == {"use_reentrant": False}
