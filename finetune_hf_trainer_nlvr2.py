"""Finetune Phi-3.5-vision on NLVR2 (two images per sample); the metric is exact-match accuracy.

Data: the_cauldron's nlvr2 config (images: exactly two, texts: one or more question/answer turns).
Training keeps every turn (the images go with the first); evaluation asks the first question, as the
original. The first --eval_size rows are held out for evaluation.

    torchrun --nproc_per_node=8 finetune_hf_trainer_nlvr2.py --bf16 --use_flash_attention --batch_size 64
    python finetune_hf_trainer_nlvr2.py --model_name_or_path /tmp/tiny --dataset_name_or_path /tmp/nlvr2 \\
        --eval_size 8 --use_lora --num_crops 1 --batch_size 2 --max_steps 2 --output_dir /tmp/out_nlvr2
"""

from phi3v.args import CauldronArguments, parse_args
from phi3v.data.conversation import Conversation, Turn
from phi3v.data.sources import load_cauldron_splits
from phi3v.recipe import run_recipe
from phi3v.task import Task


def load_splits(args: CauldronArguments):
    return load_cauldron_splits(args.dataset_name_or_path, "nlvr2", args.eval_size, images_per_row=2)


def train_conversation(row) -> Conversation:
    turns = [Turn(qa["user"], qa["assistant"]) for qa in row["texts"]]
    turns[0].images = list(row["images"])
    return Conversation(turns)


def eval_conversation(row) -> Conversation:
    first = row["texts"][0]
    return Conversation([Turn(first["user"], first["assistant"], list(row["images"]))])


TASK = Task(
    arguments=CauldronArguments,
    metric="accuracy",
    load_splits=load_splits,
    train_conversation=train_conversation,
    eval_conversation=eval_conversation,
    classification=True,  # --eval_mode likelihood picks the most likely answer among the references
)

if __name__ == "__main__":
    run_recipe(TASK, parse_args(TASK.arguments))
