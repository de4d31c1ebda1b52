"""Write a tiny checkpoint folder, laid out like the official Phi-3.5-vision one (or, with --like
phi-3-vision-128k-instruct, like Phi-3-vision-128k's), offline and in seconds.

    python -m phi3v.tiny --out /tmp/tiny [--like phi-3.5-vision-instruct --crop_size 336 --patch_size 14 --seed 0]
    python -m phi3v.tiny --out /tmp/servable --servable    # a small checkpoint vLLM can serve

The folder holds ``config.json`` (the family's official keys, small sizes, the real LongRoPE switch at 4096
tokens), ``generation_config.json`` (Phi-3.5-vision's folder has one), ``model.safetensors`` (random weights), a
small BPE tokenizer with the Phi-3 special tokens, their official ids' order and flags and the official chat
template, and the family's processor configuration. It loads through exactly the code path of the official
checkpoint.
"""

from __future__ import annotations

import sys

from .args import parse_args
from .errors import command
from .models.families import FAMILIES
from .models.tiny import write_tiny_checkpoint
from .program_args import TinyArguments


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(TinyArguments, argv, __doc__)
    family = FAMILIES[args.like]
    out = write_tiny_checkpoint(
        args.out, args.crop_size, args.patch_size, args.num_crops, args.seed, family, servable=args.servable
    )
    print(f"Wrote a tiny checkpoint like {family.hub_id} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
