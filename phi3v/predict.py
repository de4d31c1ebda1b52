"""Ask a finetuned model about images: an export, a full finetune's or a LoRA/QLoRA run's --output_dir.

    python -m phi3v.predict --model DIR --image a.jpg [--image b.jpg ...] --question "What is shown?"
    python -m phi3v.predict --model DIR --questions questions.jsonl --answers answers.jsonl [--batch_size 8]

A questions file holds one JSON object per line, ``{"id": ..., "images": [paths], "question": "..."}``,
image paths relative to --image_dir (default: the file's folder, which they may not leave). Every line
and every image (decoded) is checked before the model loads; each problem is named by file:line. Answers
are written as jsonl, one line per question, in order, as soon as each batch is answered:
``{"id", "question", "images", "answer"}``. A LoRA run loads on its base model (named in its adapter
config; --base overrides). The prompt and the stopping rules are the recipes' evaluation ones;
--num_crops defaults to the one the run trained with.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import RecipeError
from .images import BadImageError, load_sample_image
from .inference import Trained, ask, load_trained
from .sources import text_lines

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_questions(path: Path, image_dir: Path) -> list[dict]:
    """The questions of a jsonl file, every line and image checked before the model loads."""
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
        resolved = [(image_dir / image).resolve() for image in images]
        escaping = [image for image, full in zip(images, resolved) if not full.is_relative_to(image_dir)]
        missing = [str(full) for full in resolved if full.is_relative_to(image_dir) and not full.is_file()]
        if escaping or missing:
            problems.append(f"{path}:{number}: images leave {image_dir}: {escaping}" if escaping else
                            f"{path}:{number}: missing images {missing}")  # fmt: skip
            continue
        unreadable = _unreadable_images(resolved)
        if unreadable:
            problems += [f"{path}:{number}: {problem}" for problem in unreadable]
            continue
        questions.append({**item, "images": [str(full) for full in resolved]})
    if problems:
        raise ValueError("\n".join(problems))
    return questions


def _unreadable_images(images: list[Path]) -> list[str]:
    problems = []
    for number, image in enumerate(images, start=1):
        try:
            load_sample_image(number, image)
        except BadImageError as error:
            problems.append(str(error))
    return problems


def write_answers(trained: Trained, items: list[dict], answers: Path, max_new_tokens: int, batch_size: int) -> None:
    """Answer ``items`` batch by batch, each batch's answers written (and flushed) as soon as they exist."""
    with open(answers, "w") as out, tqdm(total=len(items), desc="answering", unit="question") as bar:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an exported folder, or a run's --output_dir")
    parser.add_argument("--base", help="base model of a LoRA run (default: the one its adapter config names)")
    parser.add_argument("--image", action="append", default=[], help="an image (repeat for several)")
    parser.add_argument("--question", help="the question, about the --image(s) in order")
    parser.add_argument("--questions", type=Path, help="jsonl file of questions, answered in batches")
    parser.add_argument("--answers", type=Path, help="where the answers to --questions go (jsonl)")
    parser.add_argument("--image_dir", type=Path, help="folder the --questions image paths are relative to")
    parser.add_argument("--num_crops", type=int, help="crops per image (default: the run's)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: a GPU if there is one)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="float32, or bfloat16 on a GPU")
    args = parser.parse_args(argv)
    if (args.question is None) == (args.questions is None):
        parser.error("give either --question (with --image) or --questions (with --answers)")
    if args.questions is not None and args.answers is None:
        parser.error("--questions needs --answers, the file the answers are written to")
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.questions is not None:
            items = read_questions(args.questions, args.image_dir or args.questions.parent)
        else:
            items = [{"question": args.question, "images": args.image}]
            problems = _unreadable_images([Path(image) for image in args.image])  # now, not after loading
            if problems:
                raise ValueError("\n".join(problems))
        trained = load_trained(args.model, args.base, DTYPES[args.dtype], args.device, args.num_crops)
        if args.questions is None:
            print(ask(trained, [(args.question, args.image)], args.max_new_tokens)[0])
            return 0
        write_answers(trained, items, args.answers, args.max_new_tokens, args.batch_size)
    except (RecipeError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{len(items)} answers written to {args.answers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
