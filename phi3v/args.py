"""Command-line flags of the recipes (the original's flags with their original defaults, plus a few more), and
the parser every program uses (the programs' own flags are in ``phi3v.program_args``).

Every program parses a dataclass of flags with ``parse_args``: each field is a ``--flag`` with its help
text (``--help`` lists them all), or a positional argument where its metadata says ``positional``. Checks
that need no model run in ``__post_init__``, so a bad flag fails in a second, not after the model has loaded.

The flag reference (docs/flags.md) is generated from these help texts by ``phi3v.flag_reference``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar, get_args, get_origin

from transformers import HfArgumentParser

from .errors import RecipeError
from .models.liger import check_liger_available

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_MODEL = "microsoft/Phi-3.5-vision-instruct"
CAULDRON = "HuggingFaceM4/the_cauldron"


def flag(default: Any, help: str, **kwargs: Any) -> Any:
    """A ``--flag`` with its default and help text (``kwargs`` go to argparse: choices, required, ...)."""
    return field(default=default, metadata={"help": help, **kwargs})


def positional(help: str, **kwargs: Any) -> Any:
    """A required positional argument."""
    return field(metadata={"help": help, "positional": True, **kwargs})


def check_num_crops(num_crops: int) -> None:
    if not 1 <= num_crops <= 16:
        raise ValueError(f"--num_crops must be between 1 and 16, got {num_crops}.")


@dataclass
class RecipeArguments:
    """Flags shared by the recipes (the original scripts' argparse flags, same names and defaults); the new
    ones are marked (new)."""

    model_name_or_path: str = flag(OFFICIAL_MODEL, "hub id or local folder of the model")
    dataset_name_or_path: str = flag("", "(new) hub id or local folder mirroring the hub repository")
    use_flash_attention: bool = flag(False, "load in bf16 with flash_attention_2 (implies --bf16)")
    bf16: bool = flag(False, "bf16 mixed precision; without it fp16 is used on a GPU (fp32 on a CPU)")
    use_lora: bool = flag(False, "train LoRA adapters instead of the full model")
    use_qlora: bool = flag(False, "LoRA on a 4-bit nf4 model (implies --use_lora)")
    output_dir: str = flag("./output/", "where the model, processor and eval_*.json go")
    batch_size: int = flag(16, "global effective batch size (accumulated over steps and ranks)")
    batch_size_per_gpu: int = flag(1, "(new in docvqa/hateful_memes) micro batch per device; eval batch too")
    num_crops: int = flag(16, "maximum number of 336x336 crops per image (1-16)")
    num_train_epochs: int = flag(1, "training epochs")
    max_steps: int = flag(-1, "(new) stop after this many optimizer steps (-1: run all epochs)")
    learning_rate: float = flag(4.0e-5, "peak learning rate")
    wd: float = flag(0.01, "weight decay")
    warmup_steps: int = flag(50, "(new flag, original value) linear warm-up steps")
    logging_steps: int = flag(10, "(new flag, original value) log the loss every this many steps")
    no_tqdm: bool = flag(False, "disable progress bars")
    lora_rank: int = flag(64, "LoRA rank: the inner dimension of each adapter pair")
    lora_alpha_ratio: float = flag(2.0, "LoRA alpha = round(rank * ratio)")
    lora_dropout: float = flag(0.0, "LoRA dropout")
    freeze_vision_model: bool = flag(False, "freeze CLIP, the projector and the separators")
    freeze_clip: bool = flag(False, "(new) freeze CLIP only (the projector and the separators still train)")
    freeze_projector: bool = flag(False, "(new) freeze the projector and the separators (glb_GN, sub_GN)")
    freeze_language_model: bool = flag(
        False, "(new) freeze the language model (token embeddings, decoder, lm_head): only the vision side trains"
    )
    vision_lr: float | None = flag(None, "(new) peak learning rate of CLIP (default: --learning_rate)")
    projector_lr: float | None = flag(
        None, "(new) peak learning rate of the projector and the separators (default: --learning_rate)"
    )
    use_dora: bool = flag(False, "(new) DoRA: LoRA adapters with a learned magnitude per output (needs --use_lora)")
    use_rslora: bool = flag(False, "(new) rsLoRA: adapters scaled by alpha / sqrt(rank), not alpha / rank")
    dataloader_num_workers: int = flag(4, "(new flag, original value) data-loading worker processes")
    max_eval_samples: int | None = flag(None, "(new) evaluate on at most this many samples")
    max_new_tokens: int = flag(64, "(new flag, original value) tokens generated per evaluation answer")
    eval_mode: str = flag(
        "generate",
        "(new) generate answers (the original), or pick the most likely label (classification recipes)",
        choices=["generate", "likelihood"],
    )
    seed: int = flag(42, "(new flag, Trainer's default) random seed")
    deepspeed: str = flag("ds_configs/zero2.json", "(new) DeepSpeed config for full finetuning; 'none' for plain DDP")
    trust_remote_code: bool = flag(False, "(new) allow code shipped with the checkpoint to run")
    report_to: str = flag("none", "(new) also log to an integration of the HF Trainer (tensorboard, wandb, ...)")
    save_steps: int | None = flag(
        None, "(new) write a checkpoint every N optimizer steps (default: none, as the original)"
    )
    save_total_limit: int | None = flag(None, "(new) keep only the newest K complete checkpoints")
    resume_from_checkpoint: str | None = flag(
        None, "(new) continue a run from a checkpoint folder, or 'latest' (the newest complete one in --output_dir)"
    )
    overwrite_output_dir: bool = flag(False, "(new) start over in an --output_dir that holds a run (deletes it)")
    ignore_data_change: bool = flag(
        False, "(new) resume even when the training data differs from the checkpoint's (a warning instead of a stop)"
    )
    ddp_timeout: int = flag(
        600,
        "(new) seconds a process waits for the others in a collective once the model is loaded: a process that "
        "died or hangs ends the run after this long (while loading, which may download, up to 2 hours)",
    )
    max_length: int | None = flag(
        None, "(new) longest training sample in tokens; longer ones stop the run (image tokens are never cut)"
    )
    gradient_checkpointing: str = flag(
        "true",
        "(new flag, original value) recompute activations in the backward pass: every layer (true), the decoder "
        "layers only (decoder: CLIP keeps its activations, faster, more memory) or none (false: fastest, most memory)",
        choices=["true", "decoder", "false"],
    )
    use_liger_kernel: bool = flag(
        False, "(new) Liger's Triton kernels for the decoder's RMSNorm and SwiGLU MLP (CUDA GPUs only)"
    )
    group_by_length: bool = flag(
        False, "(new) micro-batches of samples of similar length (less padding when --batch_size_per_gpu > 1)"
    )
    skip_bad_samples: bool = flag(
        False, "(new) drop bad or too long samples (counted, listed in skipped_samples.jsonl) instead of stopping"
    )
    eval_strategy: str = flag(
        "no",
        "(new) evaluate with the recipe's metric during training: every --eval_steps optimizer steps (steps), at "
        "each epoch's end (epoch), or only before and after training (no, the original)",
        choices=["no", "steps", "epoch"],
    )
    eval_steps: int | None = flag(None, "(new) evaluate every N optimizer steps (implies --eval_strategy steps)")
    eval_samples_during_training: int | None = flag(
        None,
        "(new) evaluate during training on the first K held-out samples (default: all of them); the evaluation "
        "after training always uses all",
    )
    eval_loss: bool = flag(
        False, "(new) also the validation loss on the samples evaluated during training, one forward pass each"
    )
    metric_for_best_model: str = flag(
        "",
        "(new) what --save_best, --load_best_model_at_end and early stopping compare: the recipe's metric (the "
        "default, higher is better) or loss (lower is better; needs --eval_loss)",
    )
    save_best: bool = flag(
        False,
        "(new) write a checkpoint whenever an evaluation during training beats the best so far, recorded in "
        "best_checkpoint.json; --save_total_limit never removes it",
    )
    load_best_model_at_end: bool = flag(
        False,
        "(new) the model saved to --output_dir and evaluated after training is the best checkpoint's (implies "
        "--save_best)",
    )
    early_stopping_patience: int | None = flag(
        None, "(new) stop training after P evaluations during training without improvement"
    )
    early_stopping_threshold: float = flag(
        0.0, "(new) the least gain over the best score that counts as an improvement"
    )

    def __post_init__(self) -> None:
        check_num_crops(self.num_crops)
        for name in ("batch_size", "batch_size_per_gpu", "lora_rank", "num_train_epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.dataloader_num_workers < 0:
            raise ValueError(f"--dataloader_num_workers must be 0 or more, got {self.dataloader_num_workers}.")
        at_least_one = ("max_eval_samples", "save_steps", "save_total_limit", "max_length", "ddp_timeout", "eval_steps",
                        "eval_samples_during_training", "early_stopping_patience")  # fmt: skip
        for name in at_least_one:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        self._check_evaluation_during_training()
        if self.use_qlora and not self.use_lora:
            logger.info("--use_qlora implies --use_lora.")
            self.use_lora = True
        self._check_parts()
        if self.use_flash_attention and not self.bf16:
            # Flash attention does not run in fp16 (the original README's known issue), so bf16 it is.
            logger.info("--use_flash_attention implies --bf16.")
            self.bf16 = True
        if self.use_liger_kernel:
            check_liger_available()
        if self.deepspeed.lower() in ("", "none"):
            self.deepspeed = ""
        elif not self.use_lora:
            self.deepspeed = str(_find_config(self.deepspeed))
            self._check_deepspeed_optimizer()

    def _check_deepspeed_optimizer(self) -> None:
        """Per-part rates are groups of the Trainer's optimizer, which a DeepSpeed "optimizer" section replaces."""
        rates = [f"--{name}" for name in ("vision_lr", "projector_lr") if getattr(self, name) is not None]
        if rates and "optimizer" in json.loads(Path(self.deepspeed).read_text()):
            raise ValueError(f"{' and '.join(rates)} set groups of the Trainer's optimizer, but --deepspeed "
                             f"{self.deepspeed} defines its own (an \"optimizer\" section): remove one.")  # fmt: skip

    def _check_evaluation_during_training(self) -> None:
        if self.early_stopping_threshold < 0:
            raise ValueError(f"--early_stopping_threshold must be 0 or more, got {self.early_stopping_threshold}.")
        if self.eval_steps is not None and self.eval_strategy == "no":
            self.eval_strategy = "steps"
        if self.eval_strategy == "steps" and self.eval_steps is None:
            raise ValueError("--eval_strategy steps needs --eval_steps N (evaluate every N optimizer steps).")
        if self.eval_strategy == "epoch" and self.eval_steps is not None:
            raise ValueError("--eval_steps evaluates every N steps, --eval_strategy epoch once an epoch: pick one.")
        if self.eval_steps is not None and 0 < self.max_steps < self.eval_steps:
            raise ValueError(f"--eval_steps {self.eval_steps} is more than --max_steps {self.max_steps}: no evaluation "
                             "would run during training.")  # fmt: skip
        acting = ("save_best", "load_best_model_at_end", "early_stopping_patience", "eval_samples_during_training")
        needs_evaluations = [f"--{name}" for name in acting if getattr(self, name) not in (None, False)]
        if needs_evaluations and self.eval_strategy == "no":
            raise ValueError(f"{', '.join(needs_evaluations)} acts on evaluations during training: add --eval_steps N "
                             "or --eval_strategy epoch.")  # fmt: skip
        if self.metric_for_best_model == "loss" and not self.eval_loss:
            raise ValueError("--metric_for_best_model loss compares validation losses: add --eval_loss.")
        if self.eval_loss and self.eval_strategy == "no":
            raise ValueError("--eval_loss is computed with the evaluations during training: add --eval_steps N or "
                             "--eval_strategy epoch.")  # fmt: skip
        if self.load_best_model_at_end:
            self.save_best = True

    def _check_parts(self) -> None:
        """Freezing, per-part learning rates and the LoRA variants: a combination that trains nothing, the rate of
        a frozen part, or a LoRA variant without LoRA is refused."""
        if self.freeze_vision_model:
            self.freeze_clip = self.freeze_projector = True
        if self.freeze_clip and self.freeze_projector and self.freeze_language_model:
            raise ValueError("--freeze_clip and --freeze_projector (together: --freeze_vision_model) with "
                             "--freeze_language_model freeze the whole model: nothing would train.")  # fmt: skip
        for rate, frozen, freezing in (("vision_lr", self.freeze_clip, "--freeze_clip"),
                                       ("projector_lr", self.freeze_projector, "--freeze_projector")):  # fmt: skip
            value = getattr(self, rate)
            if value is not None and value <= 0:
                raise ValueError(f"--{rate} must be more than 0, got {value}.")
            if value is not None and frozen:
                raise ValueError(f"--{rate} is the learning rate of a part that {freezing} (or --freeze_vision_model) "
                                 "freezes: drop one of them.")  # fmt: skip
        for variant in ("use_dora", "use_rslora"):
            if getattr(self, variant) and not self.use_lora:
                raise ValueError(f"--{variant} is a kind of LoRA adapter: add --use_lora (or --use_qlora).")

    @property
    def evaluates_during_training(self) -> bool:
        return self.eval_strategy != "no"

    @property
    def uses_deepspeed(self) -> bool:
        """Full finetuning runs on DeepSpeed, as in the original; LoRA and QLoRA never do."""
        return bool(self.deepspeed) and not self.use_lora

    @property
    def uses_zero3(self) -> bool:
        """ZeRO-3 shards the weights themselves, so the trained model is reloaded to be evaluated."""
        if not self.uses_deepspeed:
            return False
        return json.loads(Path(self.deepspeed).read_text()).get("zero_optimization", {}).get("stage") == 3


@dataclass
class CauldronArguments(RecipeArguments):
    """Recipes reading the_cauldron, which has only a train split: its first rows are held out."""

    dataset_name_or_path: str = flag(CAULDRON, "the_cauldron, or a local folder mirroring it")
    eval_size: int = flag(500, "(new flag, original value) leading train rows held out for evaluation")


def _find_config(path: str) -> Path:
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return candidate.resolve()
    raise ValueError(f"--deepspeed {path}: no such file (looked in . and {REPO_ROOT}). Pass 'none' for plain DDP.")


ArgsT = TypeVar("ArgsT")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag's help; the program's description printed as written."""


class _Parser(HfArgumentParser):
    """HfArgumentParser, where a field whose metadata says ``positional`` is a positional argument."""

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field) -> None:
        if not field.metadata.get("positional"):
            return HfArgumentParser._parse_dataclass_field(parser, field)
        kwargs = {key: value for key, value in field.metadata.items() if key not in ("positional", "required")}
        if get_origin(field.type) is list:
            kwargs.update(nargs="+", type=get_args(field.type)[0])
        else:
            kwargs["type"] = field.type
        parser.add_argument(field.name, **kwargs)


def parse_args(arguments_class: type[ArgsT], argv: list[str] | None = None, description: str | None = None) -> ArgsT:
    """Parse the command line into ``arguments_class``; unknown flags and bad values exit with a usage error."""
    parser = _Parser(arguments_class, allow_abbrev=False, description=description, formatter_class=_HelpFormatter)
    try:  # allow_abbrev=False: a typo must not pick a flag
        (args,) = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # a check of __post_init__: say it like argparse does, without a traceback
        parser.error(str(error))
    return args


def gradient_accumulation_steps(batch_size: int, world_size: int, batch_size_per_gpu: int) -> int:
    """batch_size / (world_size * batch_size_per_gpu), which must divide exactly."""
    per_step = world_size * batch_size_per_gpu
    if batch_size % per_step:
        raise RecipeError(
            f"--batch_size {batch_size} is not a multiple of world size {world_size} x --batch_size_per_gpu "
            f"{batch_size_per_gpu} = {per_step}. Pick a --batch_size that is, e.g. "
            f"{per_step * max(1, batch_size // per_step)}."
        )
    return batch_size // per_step


def load_script(script: str) -> ModuleType:
    """A recipe script as a module, by path or short name ("docvqa" for finetune_hf_trainer_docvqa.py)."""
    path = Path(script)
    if not path.is_file():
        path = REPO_ROOT / f"finetune_hf_trainer_{script}.py"
    if not path.is_file():
        raise RecipeError(f"{script}: no such recipe script (give its path, or docvqa, nlvr2, ...)")
    loaded = sys.modules.get(path.stem)
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == path.resolve():
        return loaded
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # a dataclass looks its module up there
    spec.loader.exec_module(module)
    return module
