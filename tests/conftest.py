"""Shared fixtures: tiny checkpoints (built once per session) and the official reference folder; shared helpers:
random images, a training batch and one training step, rows and a jsonl dataset to test on."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import phi3v  # noqa: F401  (registers the Auto classes)
from phi3v.args import RecipeArguments, parse_args
from phi3v.data.collators import TrainCollator
from phi3v.data.conversation import Conversation, Turn
from phi3v.data.samples import encode_conversation
from phi3v.data.sources import RowSource
from phi3v.models.tiny import write_tiny_checkpoint
from phi3v.training.preparation import prepare_for_training

REPO = Path(__file__).resolve().parents[1]
# A folder with phi35v_official/ and phi3v_128k_official/: the official config, processor and tokenizer files
# (no weights). The tests that compare against them skip when it is not given.
REFERENCE = Path(os.environ["PHI3V_REFERENCE_DIR"]) if os.environ.get("PHI3V_REFERENCE_DIR") else None


def reference_file(name: str) -> Path | None:
    """``name`` in the reference folder, or None when no folder is given."""
    return REFERENCE / name if REFERENCE is not None else None


def flip_bytes(path: Path, count: int = 8) -> None:
    """Damage ``count`` bytes in the middle of a file, keeping its size (what bit rot or a bad copy does)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(byte ^ 0xFF for byte in data[middle : middle + count])
    path.write_bytes(bytes(data))


def noise_image(width: int = 90, height: int = 60, seed: int = 0) -> Image.Image:
    """An RGB image of uniform noise: the same pixels for the same size and seed."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def jpeg_bytes(image: Image.Image) -> bytes:
    """``image`` as the bytes of a JPEG file."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


def list_source(rows: list) -> RowSource:
    """``rows`` as a RowSource whose rows are all kept and have no schema problems."""
    return RowSource(rows, list(range(len(rows))), "test rows", "test", lambda row: [])


def jsonl_sample(*images: str, user: str = "What is it?", assistant: str = "noise") -> dict:
    """One line of the cookbook's jsonl format: a one-turn conversation about ``images``."""
    return {
        "id": "x",
        "source": "test",
        "conversations": [{"images": list(images), "user": user, "assistant": assistant}],
    }


def write_jsonl_dataset(root: Path, files: dict[str, bytes], lines: list) -> Path:
    """images/ with ``files`` and train.jsonl with ``lines`` (dicts, or raw strings for broken lines)."""
    for name, data in files.items():
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "images" / name).write_bytes(data)
    (root / "images").mkdir(parents=True, exist_ok=True)
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    (root / "train.jsonl").write_text(text)
    return root / "train.jsonl"


def training_batch(
    processor, samples: list[Conversation] | None = None, pixel_dtype: torch.dtype = torch.float32
) -> dict:
    """``samples`` (Conversations) encoded and padded as in training. By default two samples, one with a
    two-crop image and one with a one-crop image (both of one colour)."""
    if samples is None:
        samples = [
            Conversation([Turn("What is written here?", "a receipt", [Image.new("RGB", (120, 50), (200, 30, 30))])]),
            Conversation([Turn("Colour?", "green", [Image.new("RGB", (40, 40), (20, 220, 40))])]),
        ]
    examples = [encode_conversation(processor, sample, for_training=True) for sample in samples]
    return TrainCollator(processor.tokenizer.pad_token_id, pixel_dtype)(examples)


def loss_and_gradients(
    tiny_dir, processor, flags: list[str], device: str = "cpu", autocast: torch.dtype | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward and backward of ``training_batch`` as the recipes prepare the model for ``flags``,
    optionally under autocast to ``autocast``."""
    torch.manual_seed(0)
    args = parse_args(RecipeArguments, flags)
    model = prepare_for_training(phi3v.Phi3VForCausalLM.from_pretrained(tiny_dir).to(device), args).train()
    batch = {k: v.to(device) for k, v in training_batch(processor).items()}
    with torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext():
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def require_reference(path: Path | None) -> Path:
    if path is None:
        pytest.skip("PHI3V_REFERENCE_DIR is not set: it names a folder with the official config, processor and "
                    "tokenizer files (phi35v_official/, phi3v_128k_official/)")  # fmt: skip
    if not path.exists():
        pytest.skip(f"{path} is absent (from PHI3V_REFERENCE_DIR)")
    return path


@pytest.fixture(scope="session")
def official_dir() -> Path:
    return require_reference(reference_file("phi35v_official"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Tiny checkpoint with 56-pixel crops (4 tokens per crop) so model tests run in seconds."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny56"), crop_size=56, patch_size=14, num_crops=4)


@pytest.fixture(scope="session")
def tiny_dir_336(tmp_path_factory) -> Path:
    """Tiny checkpoint with the official 336/14 geometry (144 tokens per crop)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny336"))


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    model = phi3v.Phi3VForCausalLM.from_pretrained(tiny_dir).eval()
    return model


@pytest.fixture(scope="session")
def tiny_processor(tiny_dir):
    return phi3v.Phi3VProcessor.from_pretrained(tiny_dir)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@contextlib.contextmanager
def mounted_small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A real disk of ``size`` (a tmpfs, "16m") at ``folder``, where this machine lets the tests mount one."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
