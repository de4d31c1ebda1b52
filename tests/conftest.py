"""Shared fixtures: tiny checkpoints (built once per session) and the official reference folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import phi3v  # noqa: F401  (registers the Auto classes)
from phi3v.models.tiny import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("PHI3V_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
OFFICIAL = REFERENCE / "phi35v_official"


def flip_bytes(path: Path, count: int = 8) -> None:
    """Damage ``count`` bytes in the middle of a file, keeping its size (what bit rot or a bad copy does)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(byte ^ 0xFF for byte in data[middle : middle + count])
    path.write_bytes(bytes(data))


def require_reference(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the official reference files live in ../shared on the project machines")
    return path


@pytest.fixture(scope="session")
def official_dir() -> Path:
    return require_reference(OFFICIAL)


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
