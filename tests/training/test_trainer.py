"""The Trainer's setup: the original's TrainingArguments, and the speed switches (pixels in the training dtype,
the fused AdamW) giving the same loss and update."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from phi3v import Phi3VForCausalLM
from phi3v.args import RecipeArguments, parse_args
from phi3v.training.trainer import build_training_args, setup_distributed
from tests.conftest import training_batch


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
