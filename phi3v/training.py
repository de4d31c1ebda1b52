"""Model loading, LoRA/QLoRA, freezing, the HF Trainer setup, saving and reloading for evaluation.

Training arguments are the original's fixed values (spec §1.6), with the user-facing knobs as flags.
Full finetuning runs on DeepSpeed ZeRO-2 (``ds_configs/zero2.json``) as in the original; LoRA and
QLoRA run on plain DDP. torchrun sets up one or many nodes; without torchrun a single process runs.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from accelerate import PartialState
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    BitsAndBytesConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from .args import RecipeArguments
from .checkpoints import SKIPPED_SAMPLES, CheckpointCallback
from .collators import TrainCollator
from .distributed import LOADING_TIMEOUT
from .failure import SAVING, RunProgress, resume_command
from .guards import GradientWatch, LossGuard, UnreadableSamples, trainable_parameter_table
from .liger import apply_liger_kernels
from .modeling import Phi3VForCausalLM
from .preemption import PreemptionCallback, StopRequest, start_dataloader_worker
from .report import MetricsCallback
from .sampling import LengthGroupedSampler, batched, padding_share
from .sources import require_local_or_reachable

logger = logging.getLogger(__name__)

# The original's fixed optimiser settings (spec §1.6).
ADAM_BETAS = (0.9, 0.95)
ADAM_EPSILON = 1e-7
MAX_GRAD_NORM = 1.0

# LoRA targets (spec §1.9), matched as module-name suffixes.
LANGUAGE_LORA_TARGETS = ("qkv_proj", "o_proj", "down_proj", "gate_up_proj", "lm_head")
VISION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "img_projection.0", "img_projection.2")

MODEL_OFFLINE_HINT = "`python -m phi3v.tiny --out DIR` writes a tiny checkpoint, or download the official one once."


def setup_distributed(args: RecipeArguments) -> PartialState:
    """One process group for the whole run (torchrun's env, or a single local process).

    The state is built here, before TrainingArguments, and the Trainer is told to use it: on a machine
    without CUDA, accelerate only sees torchrun's ranks with the gloo backend named explicitly, and for
    DeepSpeed it must also be told about DeepSpeed up front (otherwise it believes there is one process).
    DeepSpeed needs the torch.distributed variables even for a single process. Collectives wait up to
    LOADING_TIMEOUT until the recipe lowers it to --ddp_timeout once the model is loaded.
    """
    if args.uses_deepspeed and "RANK" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    launched = "WORLD_SIZE" in os.environ  # by torchrun, or above for DeepSpeed
    on_cpu = not torch.cuda.is_available()
    backend = "gloo" if launched and on_cpu else None
    if not args.uses_deepspeed:
        # accelerate treats CPU ranks as distributed (MULTI_CPU) only when told cpu=True
        return PartialState(cpu=on_cpu and launched, backend=backend, timeout=LOADING_TIMEOUT)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        return PartialState(backend=backend, timeout=LOADING_TIMEOUT)
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def load_processor(args: RecipeArguments):
    require_local_or_reachable(args.model_name_or_path, "--model_name_or_path", MODEL_OFFLINE_HINT)
    with PartialState().local_main_process_first():
        return AutoProcessor.from_pretrained(
            args.model_name_or_path, num_crops=args.num_crops, trust_remote_code=args.trust_remote_code
        )


def load_model(args: RecipeArguments, quantize: bool = False, path: str | None = None) -> Phi3VForCausalLM:
    """The model (``path``, default --model_name_or_path) on this rank's device: bf16 + flash attention
    with --use_flash_attention, else fp32 (fp16 mixed precision needs fp32 master weights, as the
    original notes); 4-bit nf4 for QLoRA."""
    path = path or args.model_name_or_path
    require_local_or_reachable(path, "--model_name_or_path", MODEL_OFFLINE_HINT)
    state = PartialState()
    kwargs = {
        "dtype": torch.bfloat16 if args.use_flash_attention else torch.float32,
        "attn_implementation": "flash_attention_2" if args.use_flash_attention else "sdpa",
        "trust_remote_code": args.trust_remote_code,
    }
    if quantize:
        compute_dtype = torch.bfloat16 if args.use_flash_attention else torch.float16
        if state.device.type == "cpu":
            compute_dtype = torch.float32  # fp16 kernels are GPU-only
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
        kwargs["device_map"] = {"": state.device}
    with state.local_main_process_first():
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantize and state.device.type == "cpu":
        _keep_cpu_4bit_weights_trainable(model)
    return model if quantize else model.to(state.device)


def _keep_cpu_4bit_weights_trainable(model: torch.nn.Module) -> None:
    """bitsandbytes repacks 4-bit weights for fast CPU inference the first time a layer runs in eval
    mode, and its training path then fails on the repacked weights. The evaluation before training
    would trigger that, so the repacking is switched off (CPU runs only; GPUs never repack)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def freeze_unused_vision_parameters(model: Phi3VForCausalLM) -> None:
    """CLIP's last layer and post_layernorm never run (features come from layer -2): freeze them so
    DDP and DeepSpeed, which run without unused-parameter detection, see no parameter without a gradient."""
    for parameter in model.model.vision_embed_tokens.img_processor.unused_parameters():
        parameter.requires_grad_(False)


def freeze_vision_tower(model: Phi3VForCausalLM) -> None:
    """--freeze_vision_model: CLIP, the projector and the separators.

    The original froze ``vision_embed_tokens``, which also held a reference to the token embeddings,
    so it froze them too by accident; here the token embeddings stay trainable (see README).
    """
    model.model.vision_embed_tokens.requires_grad_(False)


def lora_target_modules(model: Phi3VForCausalLM, include_vision: bool) -> list[str]:
    """Full names of the Linear layers LoRA adapts: the decoder and lm_head, plus the used CLIP layers
    and the projector unless the vision tower is frozen."""
    tower = model.model.vision_embed_tokens.img_processor
    unused = {id(p) for p in tower.unused_parameters()}
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):  # bitsandbytes Linear4bit is a Linear too
            continue
        is_vision = name.startswith("model.vision_embed_tokens.")
        targets = VISION_LORA_TARGETS if is_vision else LANGUAGE_LORA_TARGETS
        if is_vision and (not include_vision or id(module.weight) in unused):
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    return names


def apply_lora(model: Phi3VForCausalLM, args: RecipeArguments) -> PeftModel:
    """Wrap the model with LoRA adapters; only the adapters train. (The original called transformers'
    ``add_adapter``, which needs peft >= 0.22; the adapters and their saved files are the same.)"""
    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=round(args.lora_rank * args.lora_alpha_ratio),
        lora_dropout=args.lora_dropout,
        target_modules=lora_target_modules(model, include_vision=not args.freeze_vision_model),
        init_lora_weights="gaussian",
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
    if args.freeze_vision_model:
        freeze_vision_tower(model)
    if args.use_liger_kernel:
        apply_liger_kernels(model)
    if args.use_lora:
        model = apply_lora(model, args)
    enable_activation_checkpointing(model, args.gradient_checkpointing)
    logger.info("Trainable parameters:\n%s", trainable_parameter_table(model))
    return model


def training_dtype(args: RecipeArguments) -> torch.dtype:
    """The dtype the matrix products run in: bf16 or fp16 mixed precision on a GPU, fp32 on a CPU."""
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if args.bf16 else torch.float16


def build_training_args(args: RecipeArguments, accumulation_steps: int) -> TrainingArguments:
    on_gpu = torch.cuda.is_available()
    if not on_gpu and PartialState().is_main_process:
        logger.warning("No GPU: training runs in fp32 on the CPU (fp16/bf16 mixed precision need a GPU here).")
    return TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size_per_gpu,
        gradient_accumulation_steps=accumulation_steps,
        activation_checkpointing=False,  # enabled by prepare_for_training, as --gradient_checkpointing says
        optim="adamw_torch_fused" if on_gpu else "adamw_torch",  # the same update, in fewer kernels
        adam_beta1=ADAM_BETAS[0],
        adam_beta2=ADAM_BETAS[1],
        adam_epsilon=ADAM_EPSILON,
        learning_rate=args.learning_rate,
        weight_decay=args.wd,
        max_grad_norm=MAX_GRAD_NORM,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps,
        logging_steps=args.logging_steps,
        logging_nan_inf_filter=False,  # a nan loss is logged as nan, not replaced by the running average
        # The original saved nothing until the end; --save_steps writes checkpoints. Rotation is done by
        # CheckpointCallback, after a checkpoint is known to be complete.
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=None,
        bf16=on_gpu and args.bf16,
        fp16=on_gpu and not args.bf16,
        use_cpu=not on_gpu,
        remove_unused_columns=False,
        report_to=args.report_to,  # the original: "none"
        deepspeed=args.deepspeed if args.uses_deepspeed else None,
        accelerator_config={"use_configured_state": True},  # the state from setup_distributed
        disable_tqdm=args.no_tqdm,
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_prefetch_factor=2 if args.dataloader_num_workers else None,
        ddp_find_unused_parameters=False,
        seed=args.seed,
    )


class RecipeTrainer(Trainer):
    """The HF Trainer, with every micro-batch's loss shown to a LossGuard (with the rows it came from), its
    unreadable samples to UnreadableSamples, dataloader workers that leave stop signals to the main process,
    and --group_by_length's order."""

    def __init__(
        self, *args, loss_guard: LossGuard, unreadable: UnreadableSamples, group_by_length: bool = False, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.loss_guard = loss_guard
        self.unreadable = unreadable
        self.group_by_length = group_by_length

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        size = self.args.per_device_train_batch_size
        if not (self.group_by_length and size > 1):
            return super()._get_train_sampler(train_dataset)
        sampler = LengthGroupedSampler(dataset.lengths, size, self.args.seed, epoch=lambda: dataset.epoch)
        logger.info(
            "--group_by_length: micro-batches of %d samples of similar length, %.1f%% padding tokens (%.1f%% in "
            "dataset order)",
            size,
            100 * padding_share(batched(dataset.lengths, list(sampler), size)),
            100 * padding_share(batched(dataset.lengths, list(range(len(dataset))), size)),
        )
        return sampler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs.pop("rows", [])
        self.unreadable.observe(inputs.pop("unreadable", []), self.state.global_step + 1)
        if num_items_in_batch is not None:
            # A step whose every sample was skipped as unreadable has no supervised token: its loss is then 0
            # (no gradient), not 0/0. Any other step counts at least one, which this leaves as it is.
            num_items_in_batch = (
                num_items_in_batch.clamp(min=1) if torch.is_tensor(num_items_in_batch) else max(num_items_in_batch, 1)
            )
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.loss_guard.observe(result[0] if return_outputs else result, rows)
        return result

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        torch_loader = getattr(loader, "base_dataloader", loader)  # accelerate wraps torch's DataLoader
        torch_loader.worker_init_fn = partial(start_dataloader_worker, torch_loader.worker_init_fn)
        return loader


class EpochCallback(TrainerCallback):
    """Tells the dataset which epoch starts, for its per-(epoch, row) random choices."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch))  # state.epoch is fractional only mid-epoch (a resumed run)
        return control


def train_and_save(
    model,
    processor,
    train_dataset,
    args: RecipeArguments,
    accumulation_steps: int,
    resume_from: str | None,
    stop_request: StopRequest,
    describe_row: Callable[[int], str],
    metrics: MetricsCallback,
    progress: RunProgress,
) -> Phi3VForCausalLM | None:
    """Train (resuming from ``resume_from``), save the model (adapters only for LoRA) and the processor to
    --output_dir, and return the trained model without its DDP/DeepSpeed wrapper. Returns None when a stop
    signal ended training early: a checkpoint was written instead."""
    training_args = build_training_args(args, accumulation_steps)
    logger.info("Trainer: %s over %d process(es)", training_args.parallel_mode.value, training_args.world_size)
    if args.save_steps and PartialState().is_main_process:  # in the log even if the run is killed without a word
        logger.info("A checkpoint every %d steps; to continue after an interruption: %s", args.save_steps,
                    resume_command())  # fmt: skip
    loss_guard = LossGuard(describe_row)
    unreadable = UnreadableSamples(args.skip_bad_samples, Path(args.output_dir) / SKIPPED_SAMPLES)
    callbacks = [
        EpochCallback(train_dataset),
        CheckpointCallback(args.save_total_limit, train_dataset.identity()),
        loss_guard,
        unreadable,
        GradientWatch(model),
        PreemptionCallback(stop_request),
        metrics,
        progress,  # last: it sees whether the callbacks before it asked for a checkpoint
    ]
    trainer = RecipeTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=TrainCollator(processor.tokenizer.pad_token_id, pixel_dtype=training_dtype(args)),
        callbacks=callbacks,
        loss_guard=loss_guard,
        unreadable=unreadable,
        group_by_length=args.group_by_length,
    )
    trainer.train(resume_from_checkpoint=resume_from)
    if stop_request.stopped_at_step is not None:
        return None
    progress.phase = f"{SAVING} to {args.output_dir}"
    trainer.save_model()
    state = PartialState()
    if state.is_main_process:
        processor.save_pretrained(args.output_dir)
    state.wait_for_everyone()
    progress.model_saved = True
    return trainer.accelerator.unwrap_model(trainer.model)


def load_trained_for_evaluation(args: RecipeArguments) -> Phi3VForCausalLM | PeftModel:
    """What --output_dir holds, loaded for evaluation. LoRA: the unquantized base model with the saved
    adapters, as the original evaluates after LoRA/QLoRA. ZeRO-3: the saved full model, since the
    trained one is sharded across ranks and generate() would need every rank in lockstep."""
    if args.use_lora:
        return PeftModel.from_pretrained(load_model(args), args.output_dir).eval()
    unset_hf_deepspeed_config()  # otherwise from_pretrained would shard the reloaded model again
    return load_model(args, path=args.output_dir).eval()
