"""Phi-3.5-vision image processor (HD transform) and processor (text + image placeholders).

Both reproduce the official ``processing_phi3_v.py`` of microsoft/Phi-3.5-vision-instruct value for value:
the same pixels (PIL bilinear resize, centred white padding, CLIP normalisation, bicubic global view,
row-major crops, zero padding to ``num_crops + 1``) and the same ids (every text chunk tokenized with
its own ``<s>``, ``num_img_tokens`` copies of ``-k`` for ``<|image_k|>``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TAG = re.compile(r"<\|image_\d+\|>")


def num_image_tokens(rows: int, cols: int, num_img_tokens: int = 144) -> int:
    """Placeholder count for an HD canvas of rows x cols crops: (h*w + 1)*144 + 1 + (h + 1)*12 officially."""
    side = math.isqrt(num_img_tokens)
    return (rows * cols + 1) * num_img_tokens + 1 + (rows + 1) * side


def check_image_tags(text: str, num_images: int) -> None:
    """Tags must be ``<|image_1|>`` .. ``<|image_n|>``, each once and in order, for n images."""
    tags = IMAGE_TAG.findall(text)
    expected = [f"<|image_{k}|>" for k in range(1, num_images + 1)]
    if tags != expected:
        raise ValueError(
            f"The prompt's image tags {tags} do not match the {num_images} image(s) given: expected "
            f"{expected} (each tag once, numbered from 1, in order). Prompt: {text[:200]!r}"
        )


def pad_sequences(sequences: list[torch.Tensor], value: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D tensors into [B, L_max] padded with ``value`` on ``side`` ("left" or "right"), and
    return the 0/1 attention mask built from the lengths (never from comparing ids with ``value``)."""
    longest = max(len(s) for s in sequences)
    batch = torch.full((len(sequences), longest), value, dtype=sequences[0].dtype)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(0, len(sequence)) if side == "right" else slice(longest - len(sequence), longest)
        batch[row, span] = sequence
        mask[row, span] = 1
    return batch, mask


def _hd_resize(width: int, height: int, num_crops: int, crop_size: int) -> tuple[int, int]:
    """(new_width, new_height) of the resize, for an image already turned long side horizontal: the largest
    scale s with s * ceil(s / ratio) <= num_crops, width s * crop_size, height int(width / ratio)."""
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_width = scale * crop_size
    new_height = int(new_width / ratio)
    if new_height < 1:
        raise ValueError(
            f"Image of {width}x{height} pixels is too elongated for the HD transform at num_crops {num_crops} "
            f"(aspect ratio {ratio:.0f}:1 would resize it to a height of 0). Crop or pad it, or raise --num_crops."
        )
    return new_width, new_height


def canvas_grid(width: int, height: int, num_crops: int, crop_size: int = 336) -> tuple[int, int]:
    """(rows, cols) of crops the HD transform gives a width x height image, without touching pixels."""
    transposed = width < height
    if transposed:
        width, height = height, width
    new_width, new_height = _hd_resize(width, height, num_crops, crop_size)
    rows, cols = math.ceil(new_height / crop_size), new_width // crop_size
    return (cols, rows) if transposed else (rows, cols)


def hd_canvas(image: Image.Image, num_crops: int, crop_size: int = 336) -> Image.Image:
    """Resize onto the largest grid of crop_size crops that fits num_crops, padding the short side white."""
    transposed = image.width < image.height
    if transposed:  # work with the long side horizontal
        image = image.transpose(Image.Transpose.TRANSPOSE)
    new_width, new_height = _hd_resize(image.width, image.height, num_crops, crop_size)
    image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    padded_height = math.ceil(new_height / crop_size) * crop_size
    canvas = Image.new("RGB", (new_width, padded_height), (255, 255, 255))
    canvas.paste(image, (0, (padded_height - new_height) // 2))
    if transposed:
        canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
    return canvas


def to_rgb(image: Image.Image) -> Image.Image:
    """``image.convert("RGB")`` as the official processor does, except for 16-bit images, which PIL would
    clip to 0..255 (a 16-bit scan turns almost white): those are scaled down to 8 bits first."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # PNG's 16-bit greyscale opens as I or I;16
        pixels = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


class Phi3VImagesKwargs(ImagesKwargs, total=False):
    num_crops: int
    num_img_tokens: int
    crop_size: int


class Phi3VImageProcessor(BaseImageProcessor):
    """Images -> ``pixel_values`` [n, num_crops+1, 3, S, S], ``image_sizes`` [n, 2], ``num_img_tokens``.

    Slot 0 of every image is the global view, slots 1..h*w the crops in row-major order, the rest zeros.
    ``image_sizes`` is the (height, width) of the padded HD canvas, not of the original image.
    """

    model_input_names = ["pixel_values", "image_sizes"]
    valid_kwargs = Phi3VImagesKwargs

    def __init__(
        self,
        num_crops: int = 4,
        num_img_tokens: int = 144,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        do_convert_rgb: bool = True,
        crop_size: int = 336,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_crops = num_crops
        self.num_img_tokens = num_img_tokens
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.do_convert_rgb = do_convert_rgb
        self.crop_size = crop_size

    def preprocess(self, images, num_crops: int | None = None, return_tensors: str | None = "pt", **kwargs):
        """Process one PIL image or a list of them (``num_crops`` overrides the configured value)."""
        num_crops = num_crops or self.num_crops
        if not 1 <= num_crops <= 16:
            raise ValueError(f"num_crops must be between 1 and 16, got {num_crops}.")
        images = [images] if isinstance(images, Image.Image) else list(images)
        crops, sizes, tokens = zip(*(self._process_one(image, num_crops) for image in images))
        return BatchFeature(
            data={
                "pixel_values": torch.stack(crops),
                "image_sizes": torch.tensor(sizes, dtype=torch.long),
                "num_img_tokens": list(tokens),
            }
        )

    def num_tokens_for_size(self, width: int, height: int, num_crops: int | None = None) -> int:
        """Placeholder count of a width x height image, from its size alone (what preprocessing would give)."""
        rows, cols = canvas_grid(width, height, num_crops or self.num_crops, self.crop_size)
        return num_image_tokens(rows, cols, self.num_img_tokens)

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        """The official image processor's name for ``num_tokens_for_size``, which servers such as vLLM call."""
        return self.num_tokens_for_size(width, height)

    def _process_one(self, image: Image.Image, num_crops: int) -> tuple[torch.Tensor, list[int], int]:
        if not isinstance(image, Image.Image):
            raise TypeError(f"Phi3VImageProcessor expects PIL images, got {type(image).__name__}.")
        if self.do_convert_rgb:
            image = to_rgb(image)
        canvas = self._normalize(hd_canvas(image, num_crops, self.crop_size))  # [3, H, W]
        size = self.crop_size
        global_view = F.interpolate(canvas[None], size=(size, size), mode="bicubic", align_corners=False)
        height, width = canvas.shape[1:]
        rows, cols = height // size, width // size
        tiles = canvas.reshape(3, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(-1, 3, size, size)
        slots = torch.zeros(num_crops + 1, 3, size, size)
        slots[: 1 + rows * cols] = torch.cat([global_view, tiles])
        return slots, [height, width], num_image_tokens(rows, cols, self.num_img_tokens)

    def _normalize(self, image: Image.Image) -> torch.Tensor:
        # Same float ops as torchvision's ToTensor + Normalize: /255, then subtract the mean, divide by std.
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
        return pixels.sub(mean).div(std)


class Phi3VProcessor(ProcessorMixin):
    """Prompt text with ``<|image_k|>`` tags + images -> ``input_ids``, ``attention_mask``, pixels.

    A batch (a list of texts, with one list of images per text) is left-padded with the pad token, ready
    for ``generate``. Tags must be ``<|image_1|>`` .. ``<|image_n|>``, each once and in order, for n images.
    """

    def __init__(self, image_processor: Phi3VImageProcessor, tokenizer, chat_template: str | None = None, **kwargs):
        chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(
        self,
        text: str | list[str],
        images=None,
        num_crops: int | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        if isinstance(text, str):
            samples = [self._encode(text, images, num_crops)]
        else:
            images = images if images is not None else [None] * len(text)
            if len(images) != len(text):
                raise ValueError(f"Got {len(text)} texts but {len(images)} image lists; give one list per text.")
            samples = [self._encode(t, i, num_crops) for t, i in zip(text, images)]
        return self._left_pad(samples)

    def _encode(self, text: str, images, num_crops: int | None) -> dict:
        images = [images] if isinstance(images, Image.Image) else list(images or [])
        sample = {"pixel_values": None, "image_sizes": None}
        num_img_tokens = []
        if images:
            check_image_tags(text, len(images))  # before the pixels: a bad prompt fails fast
            processed = self.image_processor(images, num_crops=num_crops)
            sample = {"pixel_values": processed["pixel_values"], "image_sizes": processed["image_sizes"]}
            num_img_tokens = processed["num_img_tokens"]
        return {**sample, "input_ids": torch.tensor(self.prompt_ids(text, num_img_tokens), dtype=torch.long)}

    def prompt_ids(self, text: str, num_img_tokens: Sequence[int]) -> list[int]:
        """Token ids of a prompt whose k-th image tag stands for ``num_img_tokens[k-1]`` placeholders (-k).

        Every text chunk is tokenized with its own ``<s>``, as the official processor does."""
        check_image_tags(text, len(num_img_tokens))
        chunks = [self.tokenizer(chunk).input_ids for chunk in IMAGE_TAG.split(text)]
        input_ids = list(chunks[0])
        for k, (count, chunk) in enumerate(zip(num_img_tokens, chunks[1:]), start=1):
            input_ids += [-k] * count + list(chunk)
        return input_ids

    def _left_pad(self, samples: list[dict]) -> BatchFeature:
        ids = [s["input_ids"] for s in samples]
        input_ids, attention_mask = pad_sequences(ids, self.tokenizer.pad_token_id, "left")
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        with_images = [s for s in samples if s["pixel_values"] is not None]
        if with_images:
            data["pixel_values"] = torch.cat([s["pixel_values"] for s in with_images])
            data["image_sizes"] = torch.cat([s["image_sizes"] for s in with_images])
        return BatchFeature(data=data)

    # The official processor's image tags and placeholder count by image size, which servers such as vLLM read.
    img_tokens = [f"<|image_{k}|>" for k in range(1, 1001)]

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        return self.image_processor.num_tokens_for_size(width, height)

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end an answer, for ``generate``: ``<|end|>``, ``<|endoftext|>`` and ``</s>``, the official
        eos ids."""
        vocab = self.tokenizer.get_vocab()
        return [vocab[t] for t in ("<|end|>", "<|endoftext|>", "</s>") if t in vocab]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]


__all__ = [
    "Phi3VImageProcessor",
    "Phi3VProcessor",
    "canvas_grid",
    "check_image_tags",
    "hd_canvas",
    "num_image_tokens",
    "pad_sequences",
    "to_rgb",
]


IGNORE_INDEX = -100  # labels that take no loss
