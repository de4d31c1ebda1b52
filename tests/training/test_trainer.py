"""Training setup: LoRA targets, freezing, the original's TrainingArguments, and the speed switches (activation
checkpointing, pixels in the training dtype, the fused AdamW) giving the same loss and gradients."""

import contextlib

import pytest
import torch
from PIL import Image
from transformers import Trainer, TrainingArguments

from phi3v import Phi3VForCausalLM
from phi3v.args import RecipeArguments, parse_args
from phi3v.data.collators import TrainCollator
from phi3v.data.conversation import Conversation, Turn
from phi3v.data.samples import encode_conversation
from phi3v.training.preparation import base_model, lora_target_modules, prepare_for_training
from phi3v.training.trainer import build_training_args, setup_distributed

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
    # checkpointing is switched on by prepare_for_training, as --gradient_checkpointing says (default: every layer)
    assert training.activation_checkpointing is False
    assert parse_args(RecipeArguments, []).gradient_checkpointing == "true"


def training_batch(processor, pixel_dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Two samples, one with a two-crop image and one with a one-crop image, padded as in training."""
    samples = [
        Conversation([Turn("What is written here?", "a receipt", [Image.new("RGB", (120, 50), (200, 30, 30))])]),
        Conversation([Turn("Colour?", "green", [Image.new("RGB", (40, 40), (20, 220, 40))])]),
    ]
    examples = [encode_conversation(processor, sample, for_training=True) for sample in samples]
    return TrainCollator(processor.tokenizer.pad_token_id, pixel_dtype)(examples)


def loss_and_gradients(
    tiny_dir, processor, flags: list[str], device: str = "cpu", autocast: torch.dtype | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward and backward of ``training_batch`` as the recipes prepare the model for ``flags``,
    optionally under autocast to ``autocast``."""
    torch.manual_seed(0)
    args = parse_args(RecipeArguments, flags)
    model = prepare_for_training(Phi3VForCausalLM.from_pretrained(tiny_dir).to(device), args).train()
    batch = {k: v.to(device) for k, v in training_batch(processor).items()}
    with torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext():
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


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


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["fp32 weights", "bf16 weights"])
def test_pixels_in_the_training_dtype_give_the_same_loss(tiny_dir, tiny_processor, weights):
    """bf16 mixed precision (fp32 weights under autocast, as --bf16 trains) and bf16 weights (as
    --use_flash_attention loads): bf16 pixels give exactly the loss of fp32 pixels."""
    model = Phi3VForCausalLM.from_pretrained(tiny_dir, dtype=weights)
    batch_fp32 = training_batch(tiny_processor)
    batch_bf16 = training_batch(tiny_processor, pixel_dtype=torch.bfloat16)
    assert batch_bf16["pixel_values"].dtype == torch.bfloat16 and batch_fp32["pixel_values"].dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model(**batch_bf16).loss, model(**batch_fp32).loss, rtol=0, atol=0)


def test_the_fused_adamw_makes_the_same_update_as_the_original(tiny_dir, tiny_processor, tmp_path):
    """adamw_torch_fused (used on a GPU) against the original's adamw_torch, same settings, three steps."""
    updated = {}
    for optim in ("adamw_torch", "adamw_torch_fused"):
        torch.manual_seed(0)
        model = Phi3VForCausalLM.from_pretrained(tiny_dir).train()
        arguments = TrainingArguments(
            tmp_path, optim=optim, learning_rate=1e-3, adam_beta2=0.95, weight_decay=0.01, use_cpu=True
        )
        optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(arguments, model)
        optimizer = optimizer_class(model.parameters(), **optimizer_kwargs)
        for _ in range(3):
            model(**training_batch(tiny_processor)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        updated[optim] = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert optimizer_kwargs.get("fused") is True
    for name, weight in updated["adamw_torch"].items():
        if name.endswith("k_proj.bias"):  # its true gradient is 0 (softmax ignores a key bias): Adam scales round-off
            continue
        torch.testing.assert_close(updated["adamw_torch_fused"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
