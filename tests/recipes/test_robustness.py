"""Bad input and silent failures, end to end: what a user sees when the data or the run goes wrong."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from phi3v.data.synthetic import _write_readme, shape_image, write_cauldron
from phi3v.models.tiny import write_tiny_checkpoint
from tests.recipes.conftest import launch, launch_failing

UCF101 = "finetune_hf_trainer_ucf101.py"


def run_flags(model: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--output_dir", str(output_dir), "--num_crops", "1",
        "--batch_size", "2", "--max_steps", "4", "--logging_steps", "1", "--warmup_steps", "0",
        "--learning_rate", "1e-3", "--max_new_tokens", "2", "--no-tqdm", *extra,
    ]  # fmt: skip


def write_jsonl_dataset(folder: Path, train: list[dict], val: list[dict]) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("val", val)):
        (folder / f"ucf101_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def record(user: str, answer: str, images: list[str] = ()) -> dict:
    return {
        "id": user,
        "source": "test",
        "conversations": [{"images": list(images), "user": user, "assistant": answer}],
    }


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> Path:
    """8 training samples, 3 with an image and 5 text-only: over one epoch of 4 steps on 2 ranks, some step
    has an image on one rank only and some step has no image on any rank."""
    folder = tmp_path_factory.mktemp("mixed")
    (folder / "images").mkdir()
    for k, colour in enumerate(("red", "green", "blue")):
        shape_image(colour, "circle", "cat", seed=k).save(folder / "images" / f"{k}.jpg")
    train = [record("What colour is the shape?", c, [f"{k}.jpg"]) for k, c in enumerate(("red", "green", "blue"))]
    train += [record(f"Say the word number {k}.", f"word {k}") for k in range(5)]
    val = [record("What colour is the shape?", "red", ["0.jpg"]), record("Say the word number 1.", "word 1")]
    return write_jsonl_dataset(folder, train, val)


@pytest.mark.parametrize(
    "mode, flags",
    [
        ("full_zero2", []),
        ("frozen_vision_zero2", ["--freeze_vision_model"]),
        ("lora", ["--use_lora", "--lora_rank", "8"]),
    ],
)
def test_batches_without_images_train_on_two_ranks(mode, flags, mixed_data, tiny_dir, tmp_path):
    output_dir = tmp_path / "out"
    result = launch(UCF101, run_flags(tiny_dir, output_dir, "--data_dir", str(mixed_data), *flags), ranks=2)
    assert "World size 2, gradient accumulation 1" in result.stderr
    losses = [json.loads(line.replace("'", '"'))["loss"] for line in result.stdout.splitlines() if "'loss'" in line]
    assert len(losses) == 4 and all(np.isfinite(float(loss)) for loss in losses)
    if mode == "full_zero2":  # the image samples trained the vision side too
        before, after = load_file(tiny_dir / "model.safetensors"), load_file(output_dir / "model.safetensors")
        name = "model.vision_embed_tokens.img_projection.0.weight"
        assert not torch.equal(before[name], after[name])


def test_an_image_path_leaving_the_data_folder_stops_before_training(tiny_dir, tmp_path):
    data_dir = write_jsonl_dataset(
        tmp_path / "ucf",
        [record("q", "a"), record("q", "a", ["../../etc/passwd"])],
        [record("q", "a")],
    )
    result = launch_failing(UCF101, run_flags(tiny_dir, tmp_path / "out", "--data_dir", str(data_dir)))
    jsonl = (data_dir / "ucf101_train.jsonl").resolve()
    assert f"{jsonl}:2: turn 1: image path '../../etc/passwd' leaves the image folder" in result.stderr
    assert "Trainer:" not in result.stderr and not (tmp_path / "out" / "eval_before.json").exists()


def test_a_corrupt_hub_image_is_skipped_counted_and_listed(tiny_dir, tmp_path):
    """A truncated image in a parquet dataset: stop naming the row, or with --skip_bad_samples train without it."""
    write_cauldron(tmp_path / "memes", "hateful_memes", num_rows=12)
    rows = datasets.load_dataset(str(tmp_path / "memes"), "hateful_memes", split="train")
    rows = rows.cast_column("images", datasets.List(datasets.Image(decode=False)))
    broken = rows.map(
        lambda row, i: {
            "images": [{**image, "bytes": image["bytes"][:200]} for image in row["images"]] if i == 9 else row["images"]
        },
        with_indices=True,
    )
    broken.to_parquet(str(tmp_path / "broken" / "hateful_memes" / "train-00000-of-00001.parquet"))
    _write_readme(tmp_path / "broken", {"hateful_memes": ["train"]})
    flags = run_flags(
        tiny_dir, tmp_path / "out", "--dataset_name_or_path", str(tmp_path / "broken"), "--eval_size", "4"
    )
    script = "finetune_hf_trainer_hateful_memes.py"
    stopped = launch_failing(script, flags + ["--use_lora", "--lora_rank", "4"])
    assert "(config hateful_memes, split train) row 9: image 1" in stopped.stderr and "truncated" in stopped.stderr

    result = launch(script, flags + ["--use_lora", "--lora_rank", "4", "--skip_bad_samples"])
    assert "dropping 1 bad sample(s) (1 training, 0 evaluation)" in result.stderr
    (skipped,) = [json.loads(line) for line in (tmp_path / "out" / "skipped_samples.jsonl").read_text().splitlines()]
    assert skipped["row"] == 9 and skipped["where"].endswith("(config hateful_memes, split train) row 9")
    assert "7 training samples, 4 evaluation samples" in result.stderr


def test_a_loss_that_is_not_finite_stops_the_run_naming_steps_and_samples(tmp_path, mixed_data):
    """A checkpoint with a nan weight: the run stops after three such steps instead of training on."""
    model = write_tiny_checkpoint(tmp_path / "nan_model", crop_size=56, num_crops=1)
    weights = load_file(model / "model.safetensors")
    weights["lm_head.weight"][0, 0] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    flags = run_flags(model, tmp_path / "out", "--data_dir", str(mixed_data), "--deepspeed", "none", "--max_steps", "6")
    result = launch_failing(UCF101, flags)
    assert "not finite (nan or inf) at optimizer steps 1, 2, 3, so the run stopped" in result.stderr
    assert f"{(mixed_data / 'ucf101_train.jsonl').resolve()}:" in result.stderr
    assert "Traceback" not in result.stderr
