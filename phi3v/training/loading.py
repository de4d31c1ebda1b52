"""The one model loader: dtype, attention, 4-bit quantization, device placement and a run's adapters.

Training, the reload for the final evaluation, inference, export and the speed benchmark all load
through ``load_model``; the recipes' flags become its arguments in ``load_for_recipe``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from accelerate import PartialState
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoProcessor, BitsAndBytesConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ..args import RecipeArguments
from ..hub import require_local_or_reachable
from ..models.configuration import Phi3VConfig
from ..models.modeling import Phi3VForCausalLM

MODEL_OFFLINE_HINT = "`python -m phi3v.tiny --out DIR` writes a tiny checkpoint, or download the official one once."


def load_model(
    source: str | Path | Phi3VConfig,
    dtype: torch.dtype = torch.float32,
    attention: str = "sdpa",
    quantize_4bit: bool = False,
    device: torch.device | str | None = None,
    adapters: str | Path | None = None,
    trust_remote_code: bool = False,
    flag: str = "--model_name_or_path",
) -> Phi3VForCausalLM | PeftModel:
    """The model in ``source`` (a folder or hub id; a config gives random weights from the caller's seed).

    ``quantize_4bit``: nf4 weights computing in ``dtype`` where a GPU runs them (bf16 or fp16), fp32 on a
    CPU. ``device``: default this rank's (a GPU under torchrun's LOCAL_RANK, else the CPU). ``adapters``: the
    folder of a LoRA run whose adapters are applied on top, unmerged. ``flag`` names the source in errors.
    """
    state = PartialState()
    device = torch.device(device) if device is not None else state.device
    if isinstance(source, Phi3VConfig):
        if quantize_4bit:
            raise ValueError("4-bit layers are made while loading saved weights: give a folder, not a config.")
        with device:  # a copy: transformers records the dtype and attention on the config it is given
            return Phi3VForCausalLM._from_config(copy.deepcopy(source), attn_implementation=attention, dtype=dtype)
    require_local_or_reachable(str(source), flag, MODEL_OFFLINE_HINT)
    kwargs = {"dtype": dtype, "attn_implementation": attention, "trust_remote_code": trust_remote_code}
    if quantize_4bit:
        if device.type != "cuda":
            compute_dtype = torch.float32  # fp16 kernels are GPU-only
        elif dtype == torch.float32:
            compute_dtype = torch.float16  # fp32 master weights, fp16 products: the original's QLoRA
        else:
            compute_dtype = dtype
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
        kwargs["device_map"] = {"": device}
    with state.local_main_process_first():
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if quantize_4bit and device.type == "cpu":
        _keep_cpu_4bit_weights_trainable(model)
    if adapters is not None:
        model = PeftModel.from_pretrained(model, adapters)
    return model if quantize_4bit else model.to(device)


def _keep_cpu_4bit_weights_trainable(model: torch.nn.Module) -> None:
    """bitsandbytes repacks 4-bit weights for fast CPU inference the first time a layer runs in eval
    mode, and its training path then fails on the repacked weights. The evaluation before training
    would trigger that, so the repacking is switched off (CPU runs only; GPUs never repack)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_for_recipe(
    args: RecipeArguments, quantize: bool = False, path: str | None = None, adapters: str | None = None
) -> Phi3VForCausalLM | PeftModel:
    """The model a recipe's flags ask for (``path``, default --model_name_or_path): bf16 + flash attention
    with --use_flash_attention, else fp32 (fp16 mixed precision needs fp32 master weights, as the original
    notes); 4-bit nf4 for QLoRA, computing in bf16 with --use_flash_attention, else fp16."""
    return load_model(
        path or args.model_name_or_path,
        dtype=torch.bfloat16 if args.use_flash_attention else torch.float32,
        attention="flash_attention_2" if args.use_flash_attention else "sdpa",
        quantize_4bit=quantize,
        adapters=adapters,
        trust_remote_code=args.trust_remote_code,
    )


def load_trained_for_evaluation(args: RecipeArguments) -> Phi3VForCausalLM | PeftModel:
    """What --output_dir holds, loaded for evaluation. LoRA: the unquantized base model with the saved
    adapters, as the original evaluates after LoRA/QLoRA. ZeRO-3: the saved full model, since the
    trained one is sharded across ranks and generate() would need every rank in lockstep."""
    if args.use_lora:
        return load_for_recipe(args, adapters=args.output_dir).eval()
    unset_hf_deepspeed_config()  # otherwise from_pretrained would shard the reloaded model again
    return load_for_recipe(args, path=args.output_dir).eval()


def load_processor(args: RecipeArguments):
    """The processor of --model_name_or_path with --num_crops."""
    require_local_or_reachable(args.model_name_or_path, "--model_name_or_path", MODEL_OFFLINE_HINT)
    with PartialState().local_main_process_first():
        return AutoProcessor.from_pretrained(
            args.model_name_or_path, num_crops=args.num_crops, trust_remote_code=args.trust_remote_code
        )
