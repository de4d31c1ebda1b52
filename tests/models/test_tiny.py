"""The tiny checkpoint: CLI, official layout of the folder and tokenizer, and the README example."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

from phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VProcessor
from phi3v.models.tiny import ADDED_TOKENS, CHAT_TEMPLATE
from tests.conftest import REPO

OFFICIAL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def test_cli_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "tiny"
    result = subprocess.run(
        [sys.executable, "-m", "phi3v.tiny", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert OFFICIAL_FILES <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "phi3_v" and config["architectures"] == ["Phi3VForCausalLM"]
    assert config["img_processor"]["clip_config"]["image_size"] == 336  # official geometry by default
    assert config["img_processor"]["num_img_tokens"] == 144
    assert isinstance(AutoConfig.from_pretrained(out), Phi3VConfig)
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), Phi3VForCausalLM)
    assert isinstance(AutoProcessor.from_pretrained(out), Phi3VProcessor)


def test_tokenizer_mirrors_the_official_one(tiny_dir, official_dir):
    tiny = json.loads((tiny_dir / "tokenizer.json").read_text())
    official = json.loads((official_dir / "tokenizer.json").read_text())
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert tiny[part] == official[part], part
    flags = ("content", "lstrip", "rstrip", "normalized", "special")
    official_added = [{k: t[k] for k in flags} for t in official["added_tokens"]]
    tiny_added = [{k: t[k] for k in flags} for t in tiny["added_tokens"]]
    assert tiny_added == official_added
    official_config = json.loads((official_dir / "tokenizer_config.json").read_text())
    assert CHAT_TEMPLATE == official_config["chat_template"]


def test_tiny_special_tokens_keep_the_official_order(tiny_dir):
    raw = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    assert [raw.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    ids = [raw.token_to_id(token) for token, _ in ADDED_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ADDED_TOKENS)))
    processor = AutoProcessor.from_pretrained(tiny_dir)
    tokenizer = processor.tokenizer
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == raw.token_to_id("<|endoftext|>")
    text = "<|user|>\n<|image_1|>\nWhat colour is the shape?<|end|>\n<|assistant|>\n"
    assert tokenizer(text).input_ids == raw.encode(text).ids
    assert tokenizer.decode(tokenizer("a red circle").input_ids, skip_special_tokens=True) == "a red circle"
    config = AutoConfig.from_pretrained(tiny_dir)
    assert config.vocab_size % 64 == 0 and config.vocab_size >= len(tokenizer)


def greedy_answer(folder, question: str, image: Image.Image, max_new_tokens: int) -> str:
    """The model's greedy answer computed step by step, without ``generate``: one uncached forward pass per
    token, the argmax appended until a stop token or ``max_new_tokens``."""
    processor = AutoProcessor.from_pretrained(folder, num_crops=4)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<|image_1|>\n{question}"}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(prompt, [image])
    ids, new = inputs["input_ids"], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            sequence = torch.cat([ids, torch.tensor([new], dtype=ids.dtype)], 1)
            logits = model(input_ids=sequence, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
            new.append(int(logits.logits[0, -1].argmax()))
            if new[-1] in processor.stop_token_ids:
                break
    return processor.tokenizer.decode(new, skip_special_tokens=True)


def test_readme_example_runs(tiny_dir_336):
    """The README's Python example, run as written against a tiny folder, prints the model's greedy answer."""
    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!-- example:start -->\s*```python\n(.*?)```", readme, re.S)
    assert match, "README.md lost its example block"
    code = match.group(1).replace('"/tmp/tiny"', repr(str(tiny_dir_336)))
    assert code != match.group(1), "the example no longer loads the model from /tmp/tiny"
    asked = ['Image.new("RGB", (640, 480), "red")', "What colour is this image?", "num_crops=4", "max_new_tokens=20"]
    assert all(part in code for part in asked), "the example asks something else: update greedy_answer's inputs"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = re.findall(r"^Answer: (.*)$", result.stdout, re.M)
    assert len(printed) == 1, f"the example printed no single answer line: {result.stdout!r}"
    answer = ast.literal_eval(printed[0])
    assert isinstance(answer, str) and answer.strip(), f"an empty answer: {printed[0]}"
    image = Image.new("RGB", (640, 480), "red")
    assert answer == greedy_answer(tiny_dir_336, "What colour is this image?", image, max_new_tokens=20)


@pytest.mark.parametrize("crop, patch", [(56, 14), (28, 14), (64, 16)])
def test_small_geometries(tmp_path, crop, patch):
    from phi3v.models.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "t", crop_size=crop, patch_size=patch)
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.image_processor.crop_size == crop
    assert processor.image_processor.num_img_tokens == (crop // patch // 2) ** 2


def test_bad_geometry_is_refused(tmp_path):
    from phi3v.models.tiny import write_tiny_checkpoint

    with pytest.raises(ValueError, match="multiple of 2"):
        write_tiny_checkpoint(tmp_path / "t", crop_size=50, patch_size=14)


def test_a_servable_checkpoint_has_the_shapes_vllm_hard_codes(tmp_path, tiny_dir):
    """--servable: CLIP ViT-L/14-336, the official token ids (<|image|> 32044), 32-wide heads; the filler pieces
    before the special tokens are never produced, so text encodes as with the tiny tokenizer."""
    from phi3v.models.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "servable", servable=True)
    config = AutoConfig.from_pretrained(folder)
    clip = config.clip_vision_config()
    assert (clip.hidden_size, clip.num_hidden_layers, clip.image_size, clip.patch_size) == (1024, 24, 336, 14)
    assert config.hidden_size // config.num_attention_heads == 32 and config.vocab_size == 32064
    tokenizer = AutoProcessor.from_pretrained(folder).tokenizer
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|image|>"])
    assert ids == [32000, 32001, 32007, 32010, 32044]
    text = "<|user|>\n<|image_1|>\nWhat colour is the shape?<|end|>\n<|assistant|>\n"
    small = AutoProcessor.from_pretrained(tiny_dir).tokenizer
    assert tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids) == small.convert_ids_to_tokens(
        small(text).input_ids
    )
    with pytest.raises(ValueError, match="crop_size 336"):
        write_tiny_checkpoint(tmp_path / "other", crop_size=56, servable=True)


def test_the_processor_answers_the_official_processors_questions(tiny_dir_336):
    """img_tokens and calc_num_image_tokens_from_image_size, which servers such as vLLM call on the official
    processor: the tags, and the placeholder count the processor then writes."""
    processor = AutoProcessor.from_pretrained(tiny_dir_336)
    assert processor.img_tokens[:3] == ["<|image_1|>", "<|image_2|>", "<|image_3|>"]
    for size in ((1000, 700), (300, 1200), (336, 336)):
        inputs = processor("<|user|>\n<|image_1|>\nWhat is it?<|end|>\n<|assistant|>\n", [Image.new("RGB", size)])
        count = int((inputs["input_ids"] == -1).sum())
        assert processor.calc_num_image_tokens_from_image_size(*size) == count
        assert processor.image_processor.calc_num_image_tokens_from_image_size(*size) == count
