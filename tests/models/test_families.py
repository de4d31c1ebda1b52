"""The two families, Phi-3.5-vision and Phi-3-vision-128k: the tiny checkpoint of each (``--like``), the config.json
each family writes, and the crop count each processor config gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

from phi3v import Phi3VConfig, Phi3VProcessor
from phi3v.models.families import PHI_3_5_VISION, PHI_3_VISION_128K, family_of, official_config
from phi3v.models.tiny import write_tiny_checkpoint
from tests.conftest import REPO, reference_file, require_reference

# microsoft/Phi-3-vision-128k-instruct's config.json keys (but _name_or_path and _attn_implementation): the 3.5 ones
# without embd_pdrop, pad_token_id and resid_pdrop.
KEYS_128K = {
    "architectures", "attention_dropout", "auto_map", "bos_token_id", "embd_layer", "eos_token_id", "hidden_act",
    "hidden_size", "img_processor", "initializer_range", "intermediate_size", "max_position_embeddings", "model_type",
    "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "original_max_position_embeddings",
    "rms_norm_eps", "rope_scaling", "rope_theta", "sliding_window", "tie_word_embeddings", "torch_dtype",
    "transformers_version", "use_cache", "vocab_size",
}  # fmt: skip
PROMPT = "<|user|>\n<|image_1|>\nWhat is it?<|end|>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def tiny_128k(tmp_path_factory) -> Path:
    """The official geometry (336-pixel crops), so the token counts are the real model's."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny128k"), family=PHI_3_VISION_128K)


def test_the_cli_writes_a_128k_folder(tmp_path):
    out = tmp_path / "tiny"
    command = [sys.executable, "-m", "phi3v.tiny", "--out", str(out), "--like", "phi-3-vision-128k-instruct",
               "--crop_size", "56"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "microsoft/Phi-3-vision-128k-instruct" in result.stdout
    # the official folder's files: no generation_config.json, no processor_config.json
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json",
                                               "tokenizer.json", "tokenizer_config.json"}  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    # the tiny tokenizer's padding id is not the official 32000, so it is written; no remote code, so no auto_map
    assert set(config) == KEYS_128K - {"auto_map"} | {"pad_token_id"}
    assert config["sliding_window"] == 131072
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["num_crops"] == 16 and "do_convert_rgb" not in preprocessor
    assert "processor_class" not in json.loads((out / "tokenizer_config.json").read_text())
    assert isinstance(AutoConfig.from_pretrained(out), Phi3VConfig)
    assert isinstance(AutoProcessor.from_pretrained(out), Phi3VProcessor)
    assert AutoModelForCausalLM.from_pretrained(out).config.sliding_window == 131072


def test_each_family_is_told_by_its_config(tiny_dir, tiny_128k):
    assert family_of(AutoConfig.from_pretrained(tiny_dir)) is PHI_3_5_VISION
    assert family_of(AutoConfig.from_pretrained(tiny_128k)) is PHI_3_VISION_128K


def image_tokens(folder: Path, size: tuple[int, int]) -> int:
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(PROMPT, [Image.new("RGB", size)])
    return int((inputs["input_ids"] < 0).sum())


def test_each_processor_config_gives_its_crop_count(tiny_dir_336, tiny_128k):
    """A 1000x700 image: up to 16 crops (the 128k default) resize it to 1344x940, padded to 4x3 crops; up to 4 (the
    3.5 default) to 672x470, padded to 2x2. Tokens: (crops + 1) x 144 + 1 + (rows + 1) x 12."""
    assert image_tokens(tiny_128k, (1000, 700)) == (12 + 1) * 144 + 1 + (3 + 1) * 12
    assert image_tokens(tiny_dir_336, (1000, 700)) == (4 + 1) * 144 + 1 + (2 + 1) * 12


def test_a_128k_config_json_leaves_out_what_the_official_one_does(tiny_128k):
    config = AutoConfig.from_pretrained(tiny_128k)
    written = official_config(config, "bfloat16")
    assert set(written) == KEYS_128K | {"pad_token_id"}  # the tiny padding id is not the default
    config.pad_token_id = 32000
    assert set(official_config(config, "bfloat16")) == KEYS_128K
    again = Phi3VConfig(**official_config(config, "bfloat16"))
    assert (again.pad_token_id, again.embd_pdrop, again.resid_pdrop) == (32000, 0.0, 0.0)


@pytest.mark.parametrize("folder", ["phi35v_official", "phi3v_128k_official"])
def test_the_official_config_json_is_written_back_as_it_is(folder):
    """Each official config.json, loaded and written by the export, is the same file, value for value."""
    path = require_reference(reference_file(folder)) / "config.json"
    official = json.loads(path.read_text())
    written = official_config(Phi3VConfig(**official), official["torch_dtype"])
    ignored = {"_name_or_path", "_attn_implementation", "transformers_version"}
    assert {k: v for k, v in written.items() if k not in ignored} == {
        k: v for k, v in official.items() if k not in ignored
    }


def test_the_official_128k_processor_files_load_with_16_crops(tmp_path):
    """The official tokenizer and processor files of each family (no processor_config.json in the 128k folder): the
    same ids for the same prompt, the crop count each config gives."""
    ids = {}
    for folder, crops in (("phi35v_official", 4), ("phi3v_128k_official", 16)):
        source = require_reference(reference_file(folder))
        processor = AutoProcessor.from_pretrained(source)
        assert isinstance(processor, Phi3VProcessor) and processor.image_processor.num_crops == crops
        inputs = processor(
            "<|user|>\n<|image_1|>\nWhat is it?<|end|>\n<|assistant|>\n", [Image.new("RGB", (1000, 700))]
        )
        ids[folder] = inputs["input_ids"][inputs["input_ids"] >= 0].tolist()
    assert ids["phi35v_official"] == ids["phi3v_128k_official"]
