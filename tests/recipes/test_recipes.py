"""Every recipe script end to end on the tiny checkpoint and synthetic data, in every training mode,
under real torchrun launches (2 CPU ranks over gloo) where the mode is distributed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phi3v.data.samples import EvaluationSamples
from phi3v.data.sources import load_cauldron_splits, load_hub_dataset
from phi3v.data.synthetic import write_cauldron
from phi3v.evaluation import evaluate
from phi3v.inference import load_trained
from phi3v.task import load_task
from tests.conftest import REPO
from tests.recipes.conftest import free_port, launch

EVAL_SAMPLES = 3  # odd, so two ranks get unequal shards


SCRIPTS = {
    "docvqa": ("finetune_hf_trainer_docvqa.py", "anls"),
    "hateful_memes": ("finetune_hf_trainer_hateful_memes.py", "accuracy"),
    "nlvr2": ("finetune_hf_trainer_nlvr2.py", "accuracy"),
    "ucf101": ("finetune_hf_trainer_ucf101.py", "accuracy"),
}
MODES = {  # flags, ranks
    "full_zero2": ([], 2),
    "frozen_vision_zero2": (["--freeze_vision_model"], 2),
    "lora": (["--use_lora", "--lora_rank", "8"], 1),
    "qlora": (["--use_qlora", "--lora_rank", "8"], 1),
}


def task_flags(task: str, data: dict[str, Path]) -> list[str]:
    if task == "ucf101":
        return ["--data_dir", str(data["ucf101"])]
    flags = ["--dataset_name_or_path", str(data[task])]
    return flags + (["--eval_size", "6"] if task in ("hateful_memes", "nlvr2") else [])


def expected_references(task: str, data: dict[str, Path]) -> list[list[str]]:
    """The first EVAL_SAMPLES evaluation references, read straight from the data, in dataset order."""
    if task == "docvqa":  # through phi3v's loader: datasets alone may serve another "docvqa" folder's cache
        return load_hub_dataset(str(data["docvqa"]), None, "test", "--flag", ["answers"])["answers"][:EVAL_SAMPLES]
    if task == "ucf101":
        lines = (data["ucf101"] / "ucf101_val.jsonl").read_text().splitlines()[:EVAL_SAMPLES]
        return [[json.loads(line)["conversations"][-1]["assistant"]] for line in lines]
    rows = load_hub_dataset(str(data[task]), task, "train", "--flag", ["texts"])
    return [[texts[0]["assistant"]] for texts in rows["texts"][:EVAL_SAMPLES]]


def common_flags(tiny_dir: Path, output_dir: Path) -> list[str]:
    return [
        "--model_name_or_path",
        str(tiny_dir),
        "--output_dir",
        str(output_dir),
        "--num_crops",
        "1",
        "--batch_size",
        "4",
        "--max_steps",
        "2",
        "--max_eval_samples",
        str(EVAL_SAMPLES),
        "--max_new_tokens",
        "4",
        "--learning_rate",
        "1e-3",
        "--warmup_steps",
        "0",
        "--logging_steps",
        "1",
        "--no-tqdm",
    ]


def check_evaluations(output_dir: Path, metric: str, references: list[list[str]]) -> None:
    for name in ("eval_before.json", "eval_after.json"):
        report = json.loads((output_dir / name).read_text())
        assert 0.0 <= report[metric] <= 1.0
        assert report["num_samples"] == len(references) == EVAL_SAMPLES
        assert report["answers_unique"] == references  # every sample once, in dataset order
        assert len(report["generated_texts_unique"]) == EVAL_SAMPLES


def check_evaluation_during_training(output_dir: Path, metric: str, references: list[list[str]]) -> None:
    (evaluation,) = json.loads((output_dir / "metrics.json").read_text())["evaluations"]
    assert evaluation["step"] == 2 and 0.0 <= evaluation[metric] <= 1.0 and 0.0 < evaluation["loss"] < 100
    report = json.loads((output_dir / "evaluations" / "step-2.json").read_text())
    assert report["answers_unique"] == references and report[metric] == evaluation[metric]


def check_saved_model(output_dir: Path, tiny_dir: Path, mode: str) -> None:
    if mode in ("lora", "qlora"):
        adapters = load_file(output_dir / "adapter_model.safetensors")
        assert adapters and all("lora_" in name or "lm_head" in name or "embed" in name for name in adapters)
        assert json.loads((output_dir / "adapter_config.json").read_text())["r"] == 8
        return
    before, after = load_file(tiny_dir / "model.safetensors"), load_file(output_dir / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert "model.layers.0.self_attn.qkv_proj.weight" in changed
    vision_changed = {name for name in changed if name.startswith("model.vision_embed_tokens.")}
    if mode == "frozen_vision_zero2":
        assert not vision_changed
        assert "model.embed_tokens.weight" in changed  # the original froze these by accident; we train them
    else:
        assert "model.vision_embed_tokens.img_projection.0.weight" in vision_changed
    assert not {n for n in changed if ".encoder.layers.2." in n or "post_layernorm" in n}  # never run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("task", SCRIPTS)
def test_recipe(task, mode, data, tiny_dir, tmp_path):
    script, metric = SCRIPTS[task]
    flags, ranks = MODES[mode]
    output_dir = tmp_path / "out"
    evaluating = ["--eval_steps", "2", "--eval_loss"]  # once during training too, at the last step
    launch(script, common_flags(tiny_dir, output_dir) + task_flags(task, data) + flags + evaluating, ranks=ranks)
    check_evaluations(output_dir, metric, expected_references(task, data))
    check_evaluation_during_training(output_dir, metric, expected_references(task, data))
    check_saved_model(output_dir, tiny_dir, mode)
    assert (output_dir / "processor_config.json").exists() and (output_dir / "tokenizer.json").exists()


def test_plain_ddp_with_two_ranks(data, tiny_dir, tmp_path):
    output_dir = tmp_path / "out"
    flags = common_flags(tiny_dir, output_dir) + task_flags("docvqa", data) + ["--deepspeed", "none"]
    result = launch("finetune_hf_trainer_docvqa.py", flags, ranks=2)
    assert "World size 2, gradient accumulation 2" in result.stderr
    check_evaluations(output_dir, "anls", expected_references("docvqa", data))
    check_saved_model(output_dir, tiny_dir, "full_ddp")


def test_two_nodes_on_one_machine(data, tiny_dir, tmp_path):
    """torchrun --nnodes=2 with one process per node, both on 127.0.0.1: ranks span the two nodes."""
    output_dir = tmp_path / "out"
    port = free_port()
    flags = common_flags(tiny_dir, output_dir) + task_flags("hateful_memes", data) + ["--use_lora", "--lora_rank", "8"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={rank}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "finetune_hf_trainer_hateful_memes.py",
                *flags,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-6000:]
    assert "World size 2, gradient accumulation 2" in outputs[0][1]
    assert "Trainer: distributed over 2 process(es)" in outputs[0][1]
    check_evaluations(output_dir, "accuracy", expected_references("hateful_memes", data))


def test_the_tiny_model_learns(tmp_path, tiny_dir):
    """A real finetune: 'hateful' exactly when the shape is red, learned from the pixels."""
    write_cauldron(tmp_path / "memes", "hateful_memes", num_rows=340)
    output_dir = tmp_path / "out"
    flags = [
        "--model_name_or_path",
        str(tiny_dir),
        "--dataset_name_or_path",
        str(tmp_path / "memes"),
        "--eval_size",
        "40",
        "--output_dir",
        str(output_dir),
        "--deepspeed",
        "none",
        "--num_crops",
        "1",
        "--batch_size",
        "8",
        "--batch_size_per_gpu",
        "8",
        "--num_train_epochs",
        "6",
        "--learning_rate",
        "2e-3",
        "--warmup_steps",
        "10",
        "--max_new_tokens",
        "4",
        "--no-tqdm",
        "--eval_strategy",
        "epoch",
        "--load_best_model_at_end",
    ]
    launch("finetune_hf_trainer_hateful_memes.py", flags)
    before = json.loads((output_dir / "eval_before.json").read_text())["accuracy"]
    after = json.loads((output_dir / "eval_after.json").read_text())["accuracy"]
    assert before <= 0.5 and after >= 0.9, (before, after)
    # AUROC, Hateful Memes' official metric, from the likelihood of "yes" against "no"
    assert json.loads((output_dir / "eval_after.json").read_text())["auroc"] >= 0.9
    check_likelihood_agrees_with_generation(output_dir, tmp_path / "memes")
    check_the_best_epoch_is_kept(output_dir)


def check_the_best_epoch_is_kept(output_dir: Path) -> None:
    """The accuracy rises over the epochs and peaks before the last one (the learning rate overshoots once
    warm-up is over): the best epoch's model is the final one, with the best evaluation's accuracy."""
    metrics = json.loads((output_dir / "metrics.json").read_text())
    evaluations = metrics["evaluations"]
    assert [e["epoch"] for e in evaluations] == pytest.approx([1, 2, 3, 4, 5, 6])
    scores = [e["accuracy"] for e in evaluations]
    assert scores[-1] > scores[0] and max(scores) >= 0.9, scores
    best = json.loads((output_dir / "best_checkpoint.json").read_text())
    assert best["score"] == max(scores) and best["step"] == evaluations[scores.index(max(scores))]["step"]
    assert best["step"] < evaluations[-1]["step"], f"the accuracy no longer peaks before the end: {scores}"
    assert all(0.0 <= e["auroc"] <= 1.0 for e in evaluations)  # Hateful Memes' official metric, beside it
    after = json.loads((output_dir / "eval_after.json").read_text())
    assert after["accuracy"] == best["score"] and after["model_step"] == best["step"]
    final = load_file(output_dir / "model.safetensors")
    kept = load_file(output_dir / best["checkpoint"] / "model.safetensors")
    assert final.keys() == kept.keys() and all(torch.equal(final[name], kept[name]) for name in kept)


def check_likelihood_agrees_with_generation(model_dir: Path, data: Path) -> None:
    """Where greedy generation answers with one of the labels, scoring the labels picks the same one."""
    trained = load_trained(model_dir, device="cpu")
    _, held_out = load_cauldron_splits(str(data), "hateful_memes", eval_size=40)
    samples = EvaluationSamples(
        held_out, held_out.indices, load_task("hateful_memes").eval_conversation, trained.processor
    )
    predictions = {}
    for mode in ("generate", "likelihood"):
        report = model_dir / f"eval_{mode}.json"
        evaluate(trained.model, trained.processor, samples, "accuracy", 8, 4, report, False, mode=mode)
        predictions[mode] = [p.strip().lower() for p in json.loads(report.read_text())["generated_texts_unique"]]
    both = [(g, s) for g, s in zip(predictions["generate"], predictions["likelihood"]) if g in ("yes", "no")]
    assert len(both) >= 36 and all(g == s for g, s in both), both


@pytest.mark.parametrize("script", [s for s, _ in SCRIPTS.values() if "ucf101" not in s])
def test_hub_defaults_fail_fast_offline(script):
    """With no network the default hub ids stop in seconds, saying how to run offline."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--model_name_or_path 'microsoft/Phi-3.5-vision-instruct' is not a local folder" in result.stderr
    assert "python -m phi3v.tiny --out DIR" in result.stderr


def test_bad_batch_size_fails_before_loading(tiny_dir, data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "finetune_hf_trainer_docvqa.py",
        "--model_name_or_path",
        str(tiny_dir),
        "--batch_size",
        "3",
        "--dataset_name_or_path",
        str(data["docvqa"]),
        "--use_lora",
        "--output_dir",
        str(tmp_path),
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--batch_size 3 is not a multiple of world size 2" in result.stderr
    assert not (tmp_path / "eval_before.json").exists()


def test_full_finetune_on_zero3(data, tiny_dir, tmp_path):
    """ZeRO-3 shards the weights: the evaluation during training runs every sample on both ranks in lockstep,
    and the saved model (the best checkpoint's) is consolidated and reloaded for the second evaluation."""
    output_dir = tmp_path / "out"
    zero3 = ["--deepspeed", "ds_configs/zero3.json", "--eval_steps", "2", "--eval_loss", "--load_best_model_at_end"]
    launch(
        "finetune_hf_trainer_nlvr2.py", common_flags(tiny_dir, output_dir) + task_flags("nlvr2", data) + zero3, ranks=2
    )
    check_evaluations(output_dir, "accuracy", expected_references("nlvr2", data))
    check_evaluation_during_training(output_dir, "accuracy", expected_references("nlvr2", data))
    assert json.loads((output_dir / "eval_after.json").read_text())["model_step"] == 2
    check_saved_model(output_dir, tiny_dir, "full_zero3")
