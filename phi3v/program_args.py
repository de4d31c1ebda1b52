"""The flags of the ``python -m phi3v.*`` programs (export, predict, runs, tiny, synthetic); the recipes' flags
and the parser are in ``phi3v.args``."""

from __future__ import annotations

from dataclasses import dataclass, field

from .args import check_num_crops, flag, positional
from .models.families import FAMILIES, PHI_3_5_VISION

EXPORT_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class ExportArguments:
    model: str = flag(None, "a run's --output_dir (LoRA, QLoRA or full finetuning)", required=True)
    out: str = flag(None, "folder to write", required=True)
    base: str | None = flag(None, "base model of a LoRA run (default: the one its adapter config names)")
    dtype: str = flag("bfloat16", "dtype of the exported weights", choices=list(EXPORT_DTYPES))
    checkpoint: str | None = flag(
        None,
        "export a checkpoint of the run instead of its final model: best (best_checkpoint.json), latest, or a step",
    )
    num_crops: int | None = flag(
        None, "crops per image the exported processor config sets, which servers such as vLLM use (default: the run's)"
    )
    overwrite: bool = flag(False, "replace --out when it already holds files")

    def __post_init__(self) -> None:
        if self.num_crops is not None:
            check_num_crops(self.num_crops)


@dataclass
class PredictArguments:
    model: str = flag(None, "an exported folder, or a run's --output_dir", required=True)
    base: str | None = flag(None, "base model of a LoRA run (default: the one its adapter config names)")
    image: list[str] = field(
        default_factory=list, metadata={"help": "an image (repeat for several, in order)", "action": "append"}
    )
    question: str | None = flag(None, "the question, about the --image(s) in order")
    questions: str | None = flag(None, "jsonl file of questions, answered in batches")
    answers: str | None = flag(None, "where the answers to --questions go (jsonl)")
    image_dir: str | None = flag(None, "folder the --questions image paths are relative to (default: its folder)")
    num_crops: int | None = flag(None, "crops per image (default: the run's)")
    max_new_tokens: int = flag(64, "tokens generated per answer, at most")
    batch_size: int = flag(8, "questions answered together")
    device: str | None = flag(None, "cpu, cuda, cuda:1, ... (default: a GPU if there is one)")
    dtype: str = flag("float32", "float32, or bfloat16 on a GPU", choices=["float32", "bfloat16", "float16"])

    def __post_init__(self) -> None:
        # --image a --image b and --image a b alike
        self.image = [path for group in self.image for path in (group if isinstance(group, list) else [group])]
        if (self.question is None) == (self.questions is None):
            raise ValueError("give either --question (with --image) or --questions (with --answers)")
        if self.questions is not None and self.answers is None:
            raise ValueError("--questions needs --answers, the file the answers are written to")


@dataclass
class RunsArguments:
    paths: list[str] = positional("run folders, or folders holding them (two levels deep)")
    csv: bool = flag(False, "comma-separated values instead of a text table")


@dataclass
class TinyArguments:
    out: str = flag(None, "folder to write (created if missing)", required=True)
    crop_size: int = flag(336, "crop side in pixels (official: 336)")
    patch_size: int = flag(14, "CLIP patch side in pixels (official: 14)")
    num_crops: int | None = flag(None, "processor default num_crops (default: the family's, 4 or 16 for the 128k)")
    seed: int = flag(0, "seed of the random weights")
    like: str = flag(
        PHI_3_5_VISION.name, "the official checkpoint whose folder layout and config keys to imitate",
        choices=list(FAMILIES),
    )  # fmt: skip
    servable: bool = flag(
        False,
        "the shapes vLLM hard-codes: the full CLIP ViT-L/14-336, the official token ids, 32-wide attention heads "
        "(about 310 M parameters, 1.2 GB)",
    )

    def __post_init__(self) -> None:
        if self.servable and (self.crop_size, self.patch_size) != (336, 14):
            raise ValueError("--servable has CLIP ViT-L/14-336's geometry: --crop_size 336 --patch_size 14.")
        if self.crop_size % (2 * self.patch_size):
            raise ValueError(f"--crop_size {self.crop_size} must be a multiple of 2 x --patch_size {self.patch_size}.")


SYNTHETIC_TASKS = ("docvqa", "hateful_memes", "nlvr2", "ucf101", "custom")


@dataclass
class SyntheticArguments:
    task: str = positional("the dataset to imitate", choices=list(SYNTHETIC_TASKS))
    out: str = flag(None, "folder to write", required=True)
    num_train: int | None = flag(
        None,
        "rows: docvqa train rows (default 200); the_cauldron rows, of which the recipes hold out the first "
        "--eval_size (default 700); ucf101 training clips per class (default 4); custom training records (40)",
    )
    num_test: int | None = flag(None, "DocVQA test rows (40); custom evaluation records (10)")
    answer_variants: int = flag(1, "DocVQA answers per question", choices=[1, 2, 3])
    seed: int = flag(0, "seed of the generated data")
