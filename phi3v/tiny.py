"""Write a tiny Phi-3.5-vision checkpoint folder, laid out like the official one, offline and in seconds.

    python -m phi3v.tiny --out /tmp/tiny [--crop_size 336 --patch_size 14 --num_crops 4 --seed 0]

The folder holds ``config.json`` (official keys, small sizes, the real LongRoPE switch at 4096 tokens),
``generation_config.json``, ``model.safetensors`` (random weights), a small BPE tokenizer with the
Phi-3 special tokens, their official ids' order and flags and the official chat template, and the
processor configuration. It loads through exactly the code path of the official checkpoint.
"""

from __future__ import annotations

import sys

from .args import parse_args
from .errors import command
from .models.tiny import write_tiny_checkpoint
from .program_args import TinyArguments


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(TinyArguments, argv, __doc__)
    out = write_tiny_checkpoint(args.out, args.crop_size, args.patch_size, args.num_crops, args.seed)
    print(f"Wrote a tiny Phi-3.5-vision checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
