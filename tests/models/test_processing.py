"""Image processor (HD transform) and processor (placeholder ids) against the official behaviour."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from tokenizers import Tokenizer
from transformers import AutoImageProcessor, AutoProcessor

from phi3v.models.processing import Phi3VImageProcessor, Phi3VProcessor, hd_canvas
from tests.conftest import noise_image


def official_hd_pixels(image: Image.Image, num_crops: int, size: int = 336) -> tuple[torch.Tensor, tuple[int, int]]:
    """The official pipeline as processing_phi3_v.py runs it, with the torchvision calls the official code makes."""
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    ratio = image.width / image.height
    scale = max(s for s in range(1, 17) if s * np.ceil(s / ratio) <= num_crops)
    new_w = int(scale * size)
    new_h = int(new_w / ratio)
    image = TF.resize(image, [new_h, new_w])
    target = int(np.ceil(new_h / size) * size)
    top = int((target - new_h) / 2)
    image = TF.pad(image, [0, top, 0, target - new_h - top], fill=[255, 255, 255])
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    hd = T.Compose([T.ToTensor(), T.Normalize(mean, std)])(image)
    glb = F.interpolate(hd.unsqueeze(0).float(), size=(size, size), mode="bicubic")
    h, w = hd.shape[1] // size, hd.shape[2] // size
    crops = hd.reshape(1, 3, h, size, w, size).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, size, size)
    stacked = torch.cat([glb, crops])
    padded = torch.cat([stacked, torch.zeros(num_crops + 1 - len(stacked), 3, size, size)])
    return padded, (hd.shape[1], hd.shape[2])


@pytest.mark.parametrize(
    "size, num_crops, tokens, canvas",
    [
        ((1000, 1000), 16, 2509, (1344, 1344)),
        ((640, 480), 16, 1921, (1008, 1344)),
        ((320, 240), 4, 757, (672, 672)),
        ((640, 480), 1, 313, (336, 336)),
    ],
)
def test_documented_token_counts(size, num_crops, tokens, canvas):
    out = Phi3VImageProcessor(num_crops=num_crops)([noise_image(*size)])
    assert out["num_img_tokens"] == [tokens]
    assert tuple(out["image_sizes"][0].tolist()) == canvas
    assert out["pixel_values"].shape == (1, num_crops + 1, 3, 336, 336)


@pytest.mark.parametrize("size", [(1000, 1000), (640, 480), (480, 640), (333, 1000), (50, 800), (2000, 90), (17, 13)])
@pytest.mark.parametrize("num_crops", [1, 4, 16])
def test_pixels_equal_the_official_pipeline(size, num_crops):
    image = noise_image(*size, seed=size[0])
    out = Phi3VImageProcessor(num_crops=num_crops)([image])
    expected, canvas = official_hd_pixels(image, num_crops)
    assert tuple(out["image_sizes"][0].tolist()) == canvas
    assert torch.equal(out["pixel_values"][0], expected)


@pytest.mark.parametrize("num_crops", range(1, 17))
@pytest.mark.parametrize("size", [(800, 600), (600, 800), (1000, 120), (64, 900), (500, 500)])
def test_every_num_crops_uses_the_largest_fitting_grid(num_crops, size):
    out = Phi3VImageProcessor(num_crops=num_crops)([noise_image(*size)])
    height, width = out["image_sizes"][0].tolist()
    rows, cols = height // 336, width // 336
    assert rows * 336 == height and cols * 336 == width
    assert 1 <= rows * cols <= num_crops
    portrait = size[0] < size[1]
    scale = rows if portrait else cols  # crops along the long side
    ratio = max(size) / min(size)
    assert scale * math.ceil(scale / ratio) <= num_crops < (scale + 1) * math.ceil((scale + 1) / ratio)
    assert (rows >= cols) if portrait else (cols >= rows)
    assert out["num_img_tokens"] == [(rows * cols + 1) * 144 + 1 + (rows + 1) * 12]
    slots = out["pixel_values"][0]
    assert slots[1 + rows * cols :].abs().sum() == 0, "slots after the crops must be zero padding"
    assert slots[: 1 + rows * cols].flatten(1).abs().sum(1).gt(0).all()


def test_crops_are_row_major_tiles_of_the_canvas():
    image = noise_image(1000, 700, seed=3)
    out = Phi3VImageProcessor(num_crops=16)([image])
    height, width = out["image_sizes"][0].tolist()
    full = Phi3VImageProcessor(num_crops=16)._normalize(hd_canvas(image, 16))
    cols = width // 336
    for k in range(height // 336 * cols):
        r, c = divmod(k, cols)
        assert torch.equal(out["pixel_values"][0, 1 + k], full[:, r * 336 : (r + 1) * 336, c * 336 : (c + 1) * 336])


def test_non_rgb_images_are_converted():
    rgba = Image.new("RGBA", (400, 300), (10, 20, 30, 128))
    gray = Image.new("L", (400, 300), 77)
    processor = Phi3VImageProcessor(num_crops=4)
    for image in (rgba, gray):
        expected, _ = official_hd_pixels(image.convert("RGB"), 4)
        assert torch.equal(processor([image])["pixel_values"][0], expected)


def test_extremely_elongated_image_gets_a_clear_error():
    with pytest.raises(ValueError, match="too elongated"):
        Phi3VImageProcessor(num_crops=1)([Image.new("RGB", (20000, 1))])


# --- processor: text + placeholders ---------------------------------------------------------------


def reference_ids(tokenizer_file, text: str, token_counts: list[int]) -> list[int]:
    """The official prompt tokenization with the raw `tokenizers` library:
    each chunk with its BOS, -k x N_k for image k."""
    raw = Tokenizer.from_file(str(tokenizer_file))
    chunks = re.split(r"<\|image_\d+\|>", text)
    ids = raw.encode(chunks[0]).ids
    for k, (count, chunk) in enumerate(zip(token_counts, chunks[1:]), start=1):
        ids += [-k] * count + raw.encode(chunk).ids
    return ids


def test_official_folder_loads_without_remote_code(official_dir, monkeypatch):
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked whether to run remote code"))
    processor = AutoProcessor.from_pretrained(official_dir)
    assert isinstance(processor, Phi3VProcessor)
    assert isinstance(processor.image_processor, Phi3VImageProcessor)
    assert processor.image_processor.num_crops == 4  # the folder's preprocessor_config.json
    assert AutoProcessor.from_pretrained(official_dir, num_crops=16).image_processor.num_crops == 16
    assert isinstance(AutoImageProcessor.from_pretrained(official_dir), Phi3VImageProcessor)


def test_official_special_token_ids(official_dir):
    tokenizer = AutoProcessor.from_pretrained(official_dir).tokenizer
    expected = {
        "<unk>": 0, "<s>": 1, "</s>": 2, "<|endoftext|>": 32000, "<|assistant|>": 32001, "<|system|>": 32006,
        "<|end|>": 32007, "<|user|>": 32010, "<|image|>": 32044,
    }  # fmt: skip
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in expected} == expected
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 32000, 32000)


def test_official_ids_with_two_images(official_dir):
    processor = AutoProcessor.from_pretrained(official_dir, num_crops=4)
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|image_1|><|image_2|>\nAre the two images the same?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == "<|user|>\n<|image_1|><|image_2|>\nAre the two images the same?<|end|>\n<|assistant|>\n"
    images = [noise_image(320, 240), noise_image(300, 900)]
    out = processor(prompt, images)
    counts = processor.image_processor(images)["num_img_tokens"]
    ids = out["input_ids"][0].tolist()
    assert ids == reference_ids(official_dir / "tokenizer.json", prompt, counts)
    # <s> opens the prompt and every chunk after an image tag, as in processing_phi3_v.py
    assert ids[:2] == [1, 32010]
    assert ids[2 + 2 + counts[0]] == 1 and ids[2 + 2 + counts[0] + 1] == -2
    assert ids[2 + 2 + counts[0] + 1 + counts[1]] == 1
    assert ids[-1] == 32001  # "<|assistant|>" strips the newline after it (rstrip in tokenizer.json)
    assert out["attention_mask"].eq(1).all()
    assert out["pixel_values"].shape == (2, 5, 3, 336, 336)


@pytest.mark.parametrize(
    "text, n_images, message",
    [
        ("<|image_2|>\nhi", 1, "do not match"),
        ("<|image_1|><|image_1|>\nhi", 1, "do not match"),
        ("<|image_2|><|image_1|>\nhi", 2, "in order"),
        ("<|image_1|>\nhi", 2, "2 image"),
        ("no tags", 1, "1 image"),
        ("<|image_1|>\nhi", 0, "0 image"),
    ],
)
def test_bad_image_tags_get_a_clear_error(tiny_processor, text, n_images, message):
    with pytest.raises(ValueError, match=message):
        tiny_processor(text, [noise_image(60, 40, seed=i) for i in range(n_images)])


def test_batch_is_left_padded(tiny_processor):
    texts = ["<|image_1|>\nshort", "<|image_1|><|image_2|>\na longer question about both images"]
    images = [[noise_image(100, 80)], [noise_image(60, 120), noise_image(200, 50)]]
    batch = tiny_processor(texts, images)
    singles = [tiny_processor(t, i) for t, i in zip(texts, images)]
    width = batch["input_ids"].shape[1]
    for row, single in enumerate(singles):
        n = single["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][row, width - n :], single["input_ids"][0])
        assert batch["attention_mask"][row].tolist() == [0] * (width - n) + [1] * n
        assert batch["input_ids"][row, : width - n].eq(tiny_processor.tokenizer.pad_token_id).all()
    assert torch.equal(batch["pixel_values"], torch.cat([s["pixel_values"] for s in singles]))
    assert torch.equal(batch["image_sizes"], torch.cat([s["image_sizes"] for s in singles]))


def test_processor_save_and_reload(tiny_processor, tmp_path):
    tiny_processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, Phi3VProcessor)
    assert reloaded.image_processor.to_dict() == tiny_processor.image_processor.to_dict()
    assert reloaded.chat_template == tiny_processor.chat_template
    text = "<|user|>\n<|image_1|>\nWhat colour is the shape?<|end|>\n<|assistant|>\n"
    image = noise_image(90, 70)
    a, b = tiny_processor(text, [image]), reloaded(text, [image])
    assert all(torch.equal(a[k], b[k]) for k in a)
