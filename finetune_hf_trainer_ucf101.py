"""Finetune Phi-3.5-vision on UCF-101 clips (8 frames per sample); the metric is exact-match accuracy.

Data: the folder written by convert_ucf101.py (--data_dir): ucf101_train.jsonl and ucf101_val.jsonl,
frames under images/. The same jsonl format holds any custom multi-turn, multi-image dataset (docs/data.md).

    python convert_ucf101.py --out_dir ./ucf101
    torchrun --nproc_per_node=4 finetune_hf_trainer_ucf101.py --data_dir ./ucf101 --bf16 --use_flash_attention
"""

from dataclasses import dataclass

from phi3v.args import RecipeArguments, flag, parse_args
from phi3v.data.conversation_files import jsonl_conversation, read_conversations
from phi3v.hub import require_folder
from phi3v.recipe import run_recipe
from phi3v.task import Task


@dataclass
class UCF101Arguments(RecipeArguments):
    data_dir: str = flag(None, "folder written by convert_ucf101.py", required=True)
    num_crops: int = flag(4, "maximum crops per frame (4 for videos, to save memory)")


def load_splits(args: UCF101Arguments):
    data_dir = require_folder(args.data_dir, "--data_dir", " convert_ucf101.py writes one.")
    image_dir = data_dir / "images"
    train = read_conversations(data_dir / "ucf101_train.jsonl", image_dir)
    return train, read_conversations(data_dir / "ucf101_val.jsonl", image_dir)


TASK = Task(
    arguments=UCF101Arguments,
    metric="accuracy",
    load_splits=load_splits,
    train_conversation=jsonl_conversation,
    eval_conversation=jsonl_conversation,
    classification=True,  # --eval_mode likelihood picks the most likely answer among the references
)

if __name__ == "__main__":
    run_recipe(TASK, parse_args(TASK.arguments))
