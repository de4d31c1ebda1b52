"""Finetune Phi-3.5-vision on Hateful Memes; the metrics are exact-match accuracy and AUROC.

Data: the_cauldron's hateful_memes config (images: one meme, texts[0]: the question and "yes"/"no").
The Cauldron has only a train split: the first --eval_size rows are held out for evaluation. AUROC, the
dataset's official metric, ranks the samples by the model's probability of "yes" (against "no");
--eval_mode likelihood also takes the more likely of the two as the answer.

    torchrun --nproc_per_node=4 finetune_hf_trainer_hateful_memes.py --bf16 --use_flash_attention
    python finetune_hf_trainer_hateful_memes.py --model_name_or_path /tmp/tiny --dataset_name_or_path /tmp/hm \\
        --eval_size 8 --use_lora --num_crops 1 --batch_size 2 --max_steps 2 --output_dir /tmp/out_hm
"""

from phi3v.args import CauldronArguments, parse_args
from phi3v.data.conversation import Conversation, Turn
from phi3v.data.sources import load_cauldron_splits
from phi3v.recipe import run_recipe
from phi3v.task import Task


def load_splits(args: CauldronArguments):
    return load_cauldron_splits(args.dataset_name_or_path, "hateful_memes", args.eval_size)


def conversation(row) -> Conversation:
    qa = row["texts"][0]
    return Conversation([Turn(qa["user"], qa["assistant"], row["images"][:1])])


TASK = Task(
    arguments=CauldronArguments,
    metric="accuracy",
    load_splits=load_splits,
    train_conversation=conversation,
    eval_conversation=conversation,
    classification=True,
    auroc_label="yes",  # the dataset's official metric, from the likelihood of "yes" against "no"
)

if __name__ == "__main__":
    run_recipe(TASK, parse_args(TASK.arguments))
