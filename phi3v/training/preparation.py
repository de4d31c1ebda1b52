"""What is done to the loaded model before training: freezing, Liger kernels, LoRA, activation checkpointing."""

from __future__ import annotations

import logging
from collections.abc import Collection

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from ..args import RecipeArguments
from ..models.liger import apply_liger_kernels
from ..models.modeling import Phi3VForCausalLM
from .parts import LANGUAGE, PARTS, frozen_parts, learning_rates, part_of, trainable_parameter_table

logger = logging.getLogger(__name__)

# The LoRA targets of the original scripts' LoraConfig, matched as module-name suffixes.
LANGUAGE_LORA_TARGETS = ("qkv_proj", "o_proj", "down_proj", "gate_up_proj", "lm_head")
VISION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "img_projection.0", "img_projection.2")


def freeze_unused_vision_parameters(model: Phi3VForCausalLM) -> None:
    """CLIP's last layer and post_layernorm never run (features come from layer -2): freeze them so
    DDP and DeepSpeed, which run without unused-parameter detection, see no parameter without a gradient."""
    for parameter in model.model.vision_embed_tokens.img_processor.unused_parameters():
        parameter.requires_grad_(False)


def freeze(model: Phi3VForCausalLM, parts: Collection[str]) -> None:
    """Freeze whole parts of the model (phi3v.training.parts: vision, projector, language).

    The original's --freeze_vision_model froze ``vision_embed_tokens``, which also held a reference to the token
    embeddings, so it froze them too by accident; here they stay trainable unless the language part is frozen
    (docs/differences.md).
    """
    for name, parameter in model.named_parameters():
        if part_of(name) in parts:
            parameter.requires_grad_(False)


def lora_target_modules(model: Phi3VForCausalLM, parts: Collection[str] = PARTS) -> list[str]:
    """Full names of the Linear layers LoRA adapts in ``parts``: the decoder and lm_head (language), the used CLIP
    layers (vision), the projector (projector)."""
    tower = model.model.vision_embed_tokens.img_processor
    unused = {id(p) for p in tower.unused_parameters()}
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):  # bitsandbytes Linear4bit is a Linear too
            continue
        part = part_of(name)
        targets = LANGUAGE_LORA_TARGETS if part == LANGUAGE else VISION_LORA_TARGETS
        if part not in parts or id(module.weight) in unused:
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    return names


def apply_lora(model: Phi3VForCausalLM, args: RecipeArguments) -> PeftModel:
    """Wrap the model with LoRA adapters (DoRA, rsLoRA scaling as the flags say) on the parts that are not frozen;
    only the adapters train. (The original called transformers' ``add_adapter``, which needs peft >= 0.22; the
    adapters and their saved files are the same.)"""
    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=round(args.lora_rank * args.lora_alpha_ratio),
        lora_dropout=args.lora_dropout,
        target_modules=lora_target_modules(model, set(PARTS) - frozen_parts(args)),
        init_lora_weights="gaussian",
        use_dora=args.use_dora,
        use_rslora=args.use_rslora,
    )
    return get_peft_model(model, config)


def base_model(model: Phi3VForCausalLM | PeftModel) -> Phi3VForCausalLM:
    """The Phi3VForCausalLM itself, under LoRA's wrapper when there is one."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def enable_activation_checkpointing(model: Phi3VForCausalLM | PeftModel, which: str) -> None:
    """--gradient_checkpointing: recompute the activations of every decoder and CLIP layer in the backward pass
    ("true", the original), of the decoder layers only ("decoder"), or of none ("false")."""
    if which == "false":
        return
    # non-reentrant: LoRA's frozen inputs would otherwise cut the gradient
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if which == "decoder":
        for layer in base_model(model).model.vision_embed_tokens.img_processor.vision_model.encoder.layers:
            layer.gradient_checkpointing = False


def prepare_for_training(model: Phi3VForCausalLM, args: RecipeArguments) -> Phi3VForCausalLM | PeftModel:
    freeze_unused_vision_parameters(model)
    freeze(model, frozen_parts(args))
    if args.use_liger_kernel:
        apply_liger_kernels(model)
    if args.use_lora:
        model = apply_lora(model, args)
    enable_activation_checkpointing(model, args.gradient_checkpointing)
    logger.info("Trainable parameters:\n%s", trainable_parameter_table(model, learning_rates(args)))
    return model
