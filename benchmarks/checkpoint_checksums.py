"""What verified checkpoints cost: the checksum rate here, and what it means for a full finetune of the 4.2B model.

    .venv/bin/python benchmarks/checkpoint_checksums.py [--gigabytes 2] [--gpus 8] [--folder /tmp]

Writes --gigabytes of random bytes to a file in --folder and hashes it the way a checkpoint's files are
hashed (``phi3v.training.checkpoints.file_checksum``, xxh3-128), right after writing, so from the page cache, as each
rank hashes the files it has just written before the checkpoint is marked complete. Then prints, for full
finetuning of Phi-3.5-vision on DeepSpeed ZeRO-2 over --gpus GPUs, what each rank hashes and how long that
takes at the measured rate: rank 0 the model (model.safetensors, and DeepSpeed's copy of the module
states, both bf16) and its optimizer shard, every other rank its shard (fp32 master weights and Adam's two
moments, 12 bytes a parameter, split over the ranks). Resuming verifies the same files read back from disk,
at the disk's read rate when they are no longer cached.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_throughput import model_config  # noqa: E402
from phi3v import Phi3VForCausalLM  # noqa: E402
from phi3v.training.checkpoints import file_checksum  # noqa: E402

OFFICIAL_VOCAB, OFFICIAL_PAD = 32064, 32000
CHUNK = 64 * 1024**2


def checksum_rate(gigabytes: float, folder: Path) -> float:
    """GB/s of file_checksum on a file just written (page cache)."""
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".bin") as handle:
        for _ in range(max(1, round(gigabytes * 1e9 / CHUNK))):
            handle.write(os.urandom(CHUNK))
        handle.flush()
        size = Path(handle.name).stat().st_size
        started = time.perf_counter()
        file_checksum(Path(handle.name))
        return size / 1e9 / (time.perf_counter() - started)


def full_model_parameters() -> int:
    with torch.device("meta"):
        model = Phi3VForCausalLM(model_config("full", OFFICIAL_VOCAB, OFFICIAL_PAD))
    return sum(parameter.numel() for parameter in model.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=2.0, help="size of the file hashed")
    parser.add_argument("--gpus", type=int, default=8, help="ranks of the full-finetuning run estimated")
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()), help="where the file is written")
    args = parser.parse_args(argv)
    rate = checksum_rate(args.gigabytes, args.folder)
    print(f"xxh3-128 checksum of a {args.gigabytes:g} GB file just written to {args.folder}: {rate:.2f} GB/s")
    parameters = full_model_parameters()
    model_gb = 2 * parameters / 1e9  # bf16
    shard_gb = 12 * parameters / args.gpus / 1e9
    rank0_gb = 2 * model_gb + shard_gb
    print(f"Full finetuning of the {parameters / 1e9:.2f}B model on ZeRO-2 over {args.gpus} GPUs, per checkpoint:")
    print(f"  rank 0 hashes {rank0_gb:.1f} GB (model twice in bf16 + its optimizer shard): {rank0_gb / rate:.1f} s")
    print(f"  every other rank hashes its {shard_gb:.1f} GB optimizer shard: {shard_gb / rate:.1f} s, at the same time")


if __name__ == "__main__":
    main()
