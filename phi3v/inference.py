"""Loading a finished run (or an export, or the official checkpoint) for inference, and asking it questions.

What ``--output_dir`` holds decides how it loads:
- LoRA / QLoRA: ``adapter_config.json`` and the adapters; the base model named in the adapter config (or
  ``base``) is loaded unquantized and the adapters are applied on top, unmerged, as the recipes'
  evaluation after training does;
- a full finetune, an export or the official checkpoint: ``config.json`` and the weights.
The processor (with the ``num_crops`` used in training) comes from the same folder.

``python -m phi3v.predict``'s library is here too: a questions file read and checked before the model loads
(``read_questions``), and answers written batch by batch as they come (``write_answers``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from tqdm import tqdm
from transformers import AutoProcessor

from .data.conversation import Conversation, Turn
from .data.conversation_files import text_lines
from .data.images import BadImageError, ImageRef, load_sample_image
from .data.samples import EvaluationSamples
from .data.sources import RowSource
from .errors import RecipeError
from .evaluation import generate_answers
from .hub import HUB_ID, require_folder
from .models.modeling import Phi3VForCausalLM
from .models.processing import IMAGE_TAG
from .training.loading import load_model

logger = logging.getLogger(__name__)


@dataclass
class Trained:
    model: Phi3VForCausalLM | PeftModel
    processor: object
    kind: str  # "lora" (adapters on a base model) or "full"
    base: str | None  # the base model of a LoRA run, or the one recorded for a full run


def run_base_model(model_dir: Path) -> str | None:
    """The model a run started from: from its adapter config (LoRA) or its run_args.json."""
    adapter_config = model_dir / "adapter_config.json"
    if adapter_config.is_file():
        return json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    run_args = model_dir / "run_args.json"
    if run_args.is_file():
        return json.loads(run_args.read_text()).get("flags", {}).get("model_name_or_path")
    return None


def load_trained(
    model_dir: str | Path,
    base: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    num_crops: int | None = None,
    weights: Path | None = None,
) -> Trained:
    """The model in ``model_dir`` ready for inference on ``device`` (default: this process's GPU if there is
    one), with its processor (``num_crops``, default the one the run trained with). ``weights``: a checkpoint
    folder of the run whose model is loaded instead of the final one (the processor stays the run's)."""
    model_dir = require_folder(model_dir, "--model")
    weights = weights or model_dir
    is_lora = (weights / "adapter_config.json").is_file()
    if not is_lora and not (weights / "config.json").is_file():
        raise RecipeError(f"{weights} holds neither adapter_config.json (LoRA) nor config.json (a full model).")
    given = base is not None
    base = base or run_base_model(weights) or run_base_model(model_dir)
    if is_lora:
        if base is None:
            raise RecipeError(f"{weights}/adapter_config.json names no base model: pass --base.")
        base = _base_model(base, model_dir, given)
        model = load_model(base, dtype=dtype, device=device, adapters=weights, flag="--base")
    else:
        model = load_model(weights, dtype=dtype, device=device, flag="--model")
    processor_kwargs = {"num_crops": num_crops} if num_crops else {}
    processor = AutoProcessor.from_pretrained(model_dir, **processor_kwargs)
    return Trained(model.eval(), processor, "lora" if is_lora else "full", base)


def _base_model(base: str, model_dir: Path, given: bool) -> str:
    """Where a LoRA run's base model is: ``base`` when it exists or is a hub id; for a run trained from a local
    folder, that folder as run_args.json recorded it (a relative path then works from any folder)."""
    recorded = None if given else _recorded_model_folder(model_dir)
    if Path(base).exists():
        return base
    if recorded is not None and Path(recorded).is_dir():
        return recorded
    if recorded is None and HUB_ID.match(base) and not base.startswith("."):
        return base  # a hub id: the hub (or its cache) provides it
    if given:
        raise RecipeError(f"--base {base}: no such folder.")
    raise RecipeError(
        f"The base model of this LoRA run, {recorded or base} (named in {model_dir / 'adapter_config.json'}), does "
        "not exist: it was moved or deleted. Pass --base with the folder (or hub id) of that model."
    )


def _recorded_model_folder(model_dir: Path) -> str | None:
    """The absolute folder --model_name_or_path named when the run started, if it was a local folder."""
    run_args = model_dir / "run_args.json"
    return json.loads(run_args.read_text()).get("model_folder") if run_args.is_file() else None


def _itself(conversation: Conversation) -> Conversation:
    return conversation


def ask(
    trained: Trained,
    questions: Sequence[tuple[str, list[ImageRef]]],
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers to (question, images) pairs, with the recipes' prompt and stopping rules."""
    conversations = RowSource.of([Conversation([Turn(q, "", list(images))]) for q, images in questions], "questions")
    prompts = EvaluationSamples(conversations, conversations.indices, _itself, trained.processor)
    results = generate_answers(
        trained.model, trained.processor, prompts, list(range(len(prompts))), batch_size, max_new_tokens, False
    )
    return [result["generated_text"].strip() for result in sorted(results, key=lambda r: r["index"])]


def read_questions(path: Path, image_dir: Path) -> list[dict]:
    """The questions of a jsonl file, every line and image checked before the model loads."""
    if not path.is_file():
        raise RecipeError(f"--questions {path}: no such file.")
    image_dir = image_dir.resolve()
    questions, problems = [], []
    for number, line, not_text in text_lines(path.read_bytes()):
        if not_text is not None:
            problems.append(f"{path}:{number}: {not_text}")
            continue
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"{path}:{number}: not valid JSON ({error.msg})")
            continue
        images = item.get("images", []) if isinstance(item, dict) else None
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) or not isinstance(images, list):
            problems.append(f'{path}:{number}: needs a string "question" and a list "images"')
            continue
        if not all(isinstance(image, str) for image in images):
            problems.append(f'{path}:{number}: "images" must be a list of paths')
            continue
        if question_problem(item["question"]):
            problems.append(f"{path}:{number}: {question_problem(item['question'])}")
            continue
        resolved = [(image_dir / image).resolve() for image in images]
        escaping = [image for image, full in zip(images, resolved) if not full.is_relative_to(image_dir)]
        missing = [str(full) for full in resolved if full.is_relative_to(image_dir) and not full.is_file()]
        if escaping or missing:
            problems.append(f"{path}:{number}: images leave {image_dir}: {escaping}" if escaping else
                            f"{path}:{number}: missing images {missing}")  # fmt: skip
            continue
        unreadable = unreadable_images(resolved)
        if unreadable:
            problems += [f"{path}:{number}: {problem}" for problem in unreadable]
            continue
        questions.append({**item, "images": [str(full) for full in resolved]})
    if problems:
        raise RecipeError("\n".join(problems))
    return questions


def question_problem(question: str) -> str | None:
    """Why ``question`` cannot be asked as written: image tags are added from the images, never typed."""
    tag = IMAGE_TAG.search(question)
    return f"the question holds the image tag {tag.group()}: remove it, tags are added from the images" if tag else None


def unreadable_images(images: list[Path]) -> list[str]:
    """Why each image that cannot be decoded cannot be (missing, truncated, not an image, ...)."""
    problems = []
    for number, image in enumerate(images, start=1):
        try:
            load_sample_image(number, image)
        except BadImageError as error:
            problems.append(str(error))
    return problems


def write_answers(trained: Trained, items: list[dict], answers: Path, max_new_tokens: int, batch_size: int) -> None:
    """Answer ``items`` batch by batch, each batch's answers written (and flushed) as soon as they exist."""
    try:
        out = open(answers, "w")  # noqa: SIM115  (closed below, after the last batch)
    except OSError as error:
        raise RecipeError(f"--answers {answers}: cannot be written ({error.strerror}).") from None
    with out, tqdm(total=len(items), desc="answering", unit="question") as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            try:
                pairs = [(item["question"], item["images"]) for item in batch]
                replies = ask(trained, pairs, max_new_tokens, batch_size=len(batch))
            except (RecipeError, ValueError, OSError) as error:
                raise RecipeError(f"{error}\nThe answers to the first {start} questions are in {answers}.") from error
            out.writelines(json.dumps({**item, "answer": reply}) + "\n" for item, reply in zip(batch, replies))
            out.flush()
            bar.update(len(batch))
