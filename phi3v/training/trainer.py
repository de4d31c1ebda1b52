"""The HF Trainer setup: the process group, TrainingArguments, the Trainer subclass, training and saving.

Training arguments are the original's fixed values (``finetune_hf_trainer_docvqa.py``'s ``TrainingArguments``),
with the user-facing knobs as flags. Full finetuning runs on DeepSpeed ZeRO-2 (``ds_configs/zero2.json``) as in
the original; LoRA and QLoRA run on plain DDP. torchrun sets up one or many nodes; without torchrun a single
process runs.
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
from transformers import (
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ..args import RecipeArguments
from ..data.collators import TrainCollator, start_dataloader_worker
from ..data.sampling import LengthGroupedSampler, batched, padding_share
from ..data.validation import SKIPPED_SAMPLES
from ..distributed import LOADING_TIMEOUT
from ..models.modeling import Phi3VForCausalLM
from ..report import MetricsCallback
from .checkpoints import CheckpointCallback
from .failure import SAVING, RunProgress, resume_command
from .guards import GradientWatch, LossGuard, UnreadableSamples
from .parts import learning_rates, optimizer_groups
from .preemption import PreemptionCallback, StopRequest
from .selection import EvaluationDuringTraining

logger = logging.getLogger(__name__)

# The original scripts' fixed optimiser settings (their TrainingArguments).
ADAM_BETAS = (0.9, 0.95)
ADAM_EPSILON = 1e-7
MAX_GRAD_NORM = 1.0


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
    --group_by_length's order, and a learning rate per part of the model (``rates``: vision, projector, language)."""

    def __init__(
        self,
        *args,
        loss_guard: LossGuard,
        unreadable: UnreadableSamples,
        group_by_length: bool = False,
        rates: dict[str, float] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.loss_guard = loss_guard
        self.unreadable = unreadable
        self.group_by_length = group_by_length
        self.rates = rates

    def create_optimizer(self, model=None):
        """The Trainer's optimizer; with --vision_lr or --projector_lr, its groups are split by part, each at its
        part's rate (the weight-decay exclusions unchanged), and the learning-rate schedule scales each."""
        if self.optimizer is not None or not self.rates or set(self.rates.values()) == {self.args.learning_rate}:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        groups = optimizer_groups(
            model.named_parameters(), self.get_decay_parameter_names(model), self.args.weight_decay, self.rates
        )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

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
    selection: EvaluationDuringTraining | None = None,
) -> Phi3VForCausalLM | None:
    """Train (resuming from ``resume_from``), save the processor to --output_dir first (an export of a
    checkpoint needs it, whatever happens next), then the model (adapters only for LoRA), and return the
    trained model without its DDP/DeepSpeed wrapper. Returns None when a stop signal ended training early: a
    checkpoint was written instead. ``selection`` evaluates during training."""
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
        # after CheckpointCallback (a best is recorded once complete) and PreemptionCallback (a stop comes first)
        *([selection] if selection is not None else []),
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
        rates=learning_rates(args),
    )
    if selection is not None:
        selection.attach(trainer, stop_request)
    state = PartialState()
    if state.is_main_process:
        processor.save_pretrained(args.output_dir)
    trainer.train(resume_from_checkpoint=resume_from)
    if stop_request.stopped_at_step is not None:
        return None
    progress.phase = f"{SAVING} to {args.output_dir}"
    trainer.save_model()
    state.wait_for_everyone()
    progress.model_saved = True
    return trainer.accelerator.unwrap_model(trainer.model)
