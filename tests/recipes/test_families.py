"""The recipes on a tiny Phi-3-vision-128k checkpoint (``python -m phi3v.tiny --like phi-3-vision-128k-instruct``):
LoRA with DoRA (and rsLoRA), exported in that family's official layout with official tensor names only; full
finetuning on ZeRO-2 over 2 ranks with a learning rate per part."""

from __future__ import annotations

import contextlib
import glob
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from phi3v.exporting import export
from phi3v.inference import ask, load_trained
from phi3v.models.families import PHI_3_VISION_128K
from phi3v.models.tiny import write_tiny_checkpoint
from tests.conftest import noise_image
from tests.recipes.conftest import launch
from tests.recipes.test_recipes import common_flags

SCRIPT = "finetune_hf_trainer_docvqa.py"


@pytest.fixture(scope="module")
def tiny_128k(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny128k"), crop_size=56, family=PHI_3_VISION_128K)


def exported_names(folder: Path) -> set[str]:
    names = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as opened:
            names |= set(opened.keys())
    return names


@pytest.mark.parametrize("variant", [["--use_dora"], ["--use_dora", "--use_rslora"]], ids=["dora", "dora_rslora"])
def test_lora_with_dora_trains_and_exports_in_the_128k_layout(tiny_128k, data, tmp_path, variant):
    run, out = tmp_path / "run", tmp_path / "export"
    flags = ["--dataset_name_or_path", str(data["docvqa"]), "--use_lora", *variant, "--lora_rank", "8"]
    launch(SCRIPT, common_flags(tiny_128k, run) + flags)
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] is True and adapter_config["use_rslora"] is ("--use_rslora" in variant)
    adapters = load_file(run / "adapter_model.safetensors")
    assert [name for name in adapters if "lora_magnitude_vector" in name]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        difference = export(run, out, dtype="float32")
    assert difference < 1e-4  # the merged DoRA model computes what the run's unmerged adapters compute
    # official names only: exactly the base checkpoint's tensors, no adapter or magnitude left
    assert exported_names(out) == set(load_file(tiny_128k / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert config["sliding_window"] == 131072 and "embd_pdrop" not in config and "resid_pdrop" not in config
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["auto_map"]["AutoImageProcessor"] == "image_processing_phi3_v.Phi3VImageProcessor"
    assert preprocessor["num_crops"] == 1 and not (out / "processor_config.json").exists()
    generation = json.loads((out / "generation_config.json").read_text())
    tokenizer = load_trained(out, device="cpu").processor.tokenizer
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids(["<|end|>", "<|endoftext|>", "</s>"])
    # the run and its export answer the same
    question = [("What is written in the image?", [noise_image(seed=3)])]
    answers = [ask(load_trained(folder, device="cpu"), question, max_new_tokens=6) for folder in (run, out)]
    assert answers[0] == answers[1]


def test_full_finetune_on_zero2_with_a_learning_rate_per_part(tiny_128k, data, tmp_path):
    run = tmp_path / "run"
    flags = ["--dataset_name_or_path", str(data["docvqa"]), "--vision_lr", "1e-2", "--projector_lr", "3e-3",
             "--save_steps", "2"]  # fmt: skip
    result = launch(SCRIPT, common_flags(tiny_128k, run) + flags, ranks=2)  # common flags: --learning_rate 1e-3
    table = result.stderr[result.stderr.index("Trainable parameters") :].splitlines()
    rates = {line[:40].strip(): line[72:].strip() for line in table[2:9]}
    assert rates["vision tower (CLIP)"] == "0.01" and rates["projector"] == "0.003" and rates["lm_head"] == "0.001"
    (states,) = glob.glob(str(run / "checkpoint-2" / "global_step2" / "zero_pp_rank_0_*optim_states.pt"))
    groups = torch.load(states, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    assert sorted((group["part"], group["initial_lr"]) for group in groups) == [
        ("language", 1e-3), ("language", 1e-3), ("projector", 3e-3), ("projector", 3e-3), ("vision", 1e-2),
        ("vision", 1e-2),
    ]  # fmt: skip
    before, after = load_file(tiny_128k / "model.safetensors"), load_file(run / "model.safetensors")
    clip_layer = "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1.weight"
    for name in (
        clip_layer,
        "model.vision_embed_tokens.img_projection.0.weight",
        "model.layers.0.mlp.down_proj.weight",
    ):
        assert not torch.equal(before[name], after[name]), name
