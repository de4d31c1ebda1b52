"""Finetune Phi-3.5-vision on DocVQA; the metric is ANLS (threshold 0.5).

Data: nielsr/docvqa_1200_examples (1000 train / 200 test rows: image, query["en"], answers), or with
--full_train the_cauldron's docvqa config for training (images, texts[user/assistant]). Evaluation always
uses the mini test split with the "Answer briefly." prompt, as the original.

    torchrun --nproc_per_node=4 finetune_hf_trainer_docvqa.py --bf16 --use_flash_attention
    python finetune_hf_trainer_docvqa.py --model_name_or_path /tmp/tiny --dataset_name_or_path /tmp/dv \\
        --use_lora --num_crops 1 --batch_size 2 --max_steps 2 --max_eval_samples 4 --output_dir /tmp/out_dv
"""

import random
from dataclasses import dataclass

from phi3v.args import CAULDRON, RecipeArguments, flag, parse_args
from phi3v.data import Conversation, Turn, load_hub_dataset
from phi3v.recipe import Task, run_recipe


@dataclass
class DocVQAArguments(RecipeArguments):
    dataset_name_or_path: str = flag("nielsr/docvqa_1200_examples", "DocVQA mini dataset (train and test splits)")
    full_train: bool = flag(False, "train on the_cauldron's full DocVQA train set instead of the mini split")
    full_train_dataset_name_or_path: str = flag(CAULDRON, "(new) the_cauldron, for --full_train")


def load_splits(args: DocVQAArguments):
    mini_columns = ["image", "query", "answers"]
    flag = "--dataset_name_or_path"
    eval_rows = load_hub_dataset(args.dataset_name_or_path, None, "test", flag, mini_columns)
    if args.full_train:
        flag = "--full_train_dataset_name_or_path"
        return load_hub_dataset(
            args.full_train_dataset_name_or_path, "docvqa", "train", flag, ["images", "texts"]
        ), eval_rows
    return load_hub_dataset(args.dataset_name_or_path, None, "train", flag, mini_columns), eval_rows


def mini_conversation(row) -> Conversation:
    """A random reference answer is the target each time the row is seen (original behaviour)."""
    turn = Turn(f"{row['query']['en']}\nAnswer briefly.", random.choice(row["answers"]), [row["image"]])
    return Conversation([turn], answers=row["answers"])


def train_conversation(row) -> Conversation:
    if "texts" in row:  # --full_train: a random question about the image each time it is seen
        qa = random.choice(row["texts"])
        return Conversation([Turn(qa["user"], qa["assistant"], row["images"][:1])])
    return mini_conversation(row)


TASK = Task(
    metric="anls", load_splits=load_splits, train_conversation=train_conversation, eval_conversation=mini_conversation
)

if __name__ == "__main__":
    run_recipe(TASK, parse_args(DocVQAArguments))
