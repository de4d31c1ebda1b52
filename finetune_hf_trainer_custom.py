"""Finetune Phi-3.5-vision on your own data: conversation jsonl (the cookbook's format) or LLaVA-style JSON.

Data: --train_file and --eval_file, each either
- jsonl, one sample per line: {"id", "source", "conversations": [{"images": [paths], "user", "assistant"}, ...]}
  (the UCF-101 format: multi-turn, several images per turn, or none), or
- a LLaVA JSON list: [{"id", "image": path or "images": [paths], "conversations": [{"from": "human",
  "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}, ...],
told apart by the file. Image paths are relative to --image_dir (default: the folder of --train_file).
Training learns every turn; evaluation asks each evaluation sample's last turn, the earlier turns as
context, and scores the answers with --metric (anls, accuracy, or none to only write them).

    python -m phi3v.synthetic custom --out /tmp/custom
    python finetune_hf_trainer_custom.py --model_name_or_path /tmp/tiny --train_file /tmp/custom/train.json \\
        --eval_file /tmp/custom/eval.json --use_lora --num_crops 1 --batch_size 2 --max_steps 2 --output_dir /tmp/out
"""

from dataclasses import dataclass
from pathlib import Path

from phi3v.args import RecipeArguments, flag, parse_args
from phi3v.data.conversation_files import jsonl_conversation, read_conversations
from phi3v.recipe import run_recipe
from phi3v.task import Task


@dataclass
class CustomArguments(RecipeArguments):
    train_file: str = flag(None, "training conversations: .jsonl (cookbook format) or LLaVA .json", required=True)
    eval_file: str = flag(None, "evaluation conversations, in either format", required=True)
    image_dir: str | None = flag(None, "folder the image paths are relative to (default: --train_file's folder)")
    metric: str = flag("accuracy", "how evaluation answers are scored", choices=["anls", "accuracy", "none"])


def load_splits(args: CustomArguments):
    image_dir = args.image_dir or Path(args.train_file).parent
    return read_conversations(args.train_file, image_dir), read_conversations(args.eval_file, image_dir)


TASK = Task(
    arguments=CustomArguments,
    metric=None,  # --metric
    load_splits=load_splits,
    train_conversation=jsonl_conversation,
    eval_conversation=jsonl_conversation,
)

if __name__ == "__main__":
    run_recipe(TASK, parse_args(TASK.arguments))
