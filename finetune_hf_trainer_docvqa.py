"""Finetune Phi-3.5-vision on DocVQA; the metric is ANLS (threshold 0.5).

Data: nielsr/docvqa_1200_examples (1000 train / 200 test rows: image, query["en"], answers), or with
--full_train the_cauldron's docvqa config for training (images, texts[user/assistant]). Evaluation always
uses the mini test split with the "Answer briefly." prompt, as the original.

    torchrun --nproc_per_node=4 finetune_hf_trainer_docvqa.py --bf16 --use_flash_attention
    python finetune_hf_trainer_docvqa.py --model_name_or_path /tmp/tiny --dataset_name_or_path /tmp/dv \\
        --use_lora --num_crops 1 --batch_size 2 --max_steps 2 --max_eval_samples 4 --output_dir /tmp/out_dv
"""

from dataclasses import dataclass

from phi3v.args import CAULDRON, RecipeArguments, flag, parse_args
from phi3v.data.conversation import Conversation, Turn
from phi3v.data.sources import load_hub_source
from phi3v.recipe import run_recipe
from phi3v.task import Task

MINI_COLUMNS = ["image", "query", "answers"]


@dataclass
class DocVQAArguments(RecipeArguments):
    dataset_name_or_path: str = flag("nielsr/docvqa_1200_examples", "DocVQA mini dataset (train and test splits)")
    full_train: bool = flag(False, "train on the_cauldron's full DocVQA train set instead of the mini split")
    full_train_dataset_name_or_path: str = flag(CAULDRON, "(new) the_cauldron, for --full_train")


def load_splits(args: DocVQAArguments):
    held_out = load_hub_source(args.dataset_name_or_path, None, "test", "--dataset_name_or_path", MINI_COLUMNS)
    if args.full_train:
        flag = "--full_train_dataset_name_or_path"
        train = load_hub_source(args.full_train_dataset_name_or_path, "docvqa", "train", flag, ["images", "texts"])
    else:
        train = load_hub_source(args.dataset_name_or_path, None, "train", "--dataset_name_or_path", MINI_COLUMNS)
    return train, held_out


def mini_conversation(row, answer: str) -> Conversation:
    turn = Turn(f"{row['query']['en']}\nAnswer briefly.", answer, [row["image"]])
    return Conversation([turn], answers=row["answers"])


def train_conversation(row) -> list[Conversation]:
    """Each time a row is seen, one of its reference answers is the target (--full_train: one of the
    image's questions), drawn at random as the original does."""
    if "texts" in row:
        return [Conversation([Turn(qa["user"], qa["assistant"], row["images"][:1])]) for qa in row["texts"]]
    return [mini_conversation(row, answer) for answer in row["answers"]]


def eval_conversation(row) -> Conversation:
    return mini_conversation(row, row["answers"][0])


TASK = Task(
    arguments=DocVQAArguments,
    metric="anls",
    load_splits=load_splits,
    train_conversation=train_conversation,
    eval_conversation=eval_conversation,
)

if __name__ == "__main__":
    run_recipe(TASK, parse_args(TASK.arguments))
