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

import logging
import sys
from pathlib import Path

import torch

from .args import parse_args
from .errors import RecipeError, command
from .inference import ask, load_trained, question_problem, read_questions, unreadable_images, write_answers
from .program_args import PredictArguments

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(PredictArguments, argv, __doc__)
    logging.basicConfig(level=logging.WARNING)
    if args.questions is not None:
        questions = Path(args.questions)
        items = read_questions(questions, Path(args.image_dir) if args.image_dir else questions.parent)
    else:
        items = [{"question": args.question, "images": args.image}]
        problems = [question_problem(args.question)] if question_problem(args.question) else []
        problems += unreadable_images([Path(image) for image in args.image])  # now, not after loading
        if problems:
            raise RecipeError("\n".join(problems))
    trained = load_trained(args.model, args.base, DTYPES[args.dtype], args.device, args.num_crops)
    if args.questions is None:
        print(ask(trained, [(args.question, args.image)], args.max_new_tokens)[0])
        return 0
    write_answers(trained, items, Path(args.answers), args.max_new_tokens, args.batch_size)
    print(f"{len(items)} answers written to {args.answers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
