"""Synthetic datasets in the exact hub schemas, so every recipe runs offline on the same code path.

    python -m phi3v.synthetic docvqa        --out DIR   # nielsr/docvqa_1200_examples layout (+ DIR/the_cauldron)
    python -m phi3v.synthetic hateful_memes --out DIR   # HuggingFaceM4/the_cauldron, config hateful_memes
    python -m phi3v.synthetic nlvr2         --out DIR   # HuggingFaceM4/the_cauldron, config nlvr2
    python -m phi3v.synthetic ucf101        --out DIR   # DIR/UCF101_subset/{train,val,test}/<Class>/*.avi
    python -m phi3v.synthetic custom        --out DIR   # DIR/{train,eval}.jsonl and DIR/{train,eval}.json, DIR/images

Each folder mirrors its hub repository (parquet shards plus a README.md whose YAML names the configs and
splits), so ``datasets.load_dataset(DIR[, config])`` reads it like the hub id. Every question is
answerable from the image alone (colours and shapes drawn large), so a finetune measurably learns it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .args import parse_args
from .data.synthetic import write_cauldron, write_custom, write_docvqa, write_ucf101
from .errors import command
from .program_args import SyntheticArguments


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(SyntheticArguments, argv, __doc__)
    out = Path(args.out)
    if args.task == "docvqa":
        write_docvqa(out, args.num_train or 200, args.num_test or 40, args.seed, args.answer_variants)
    elif args.task == "custom":
        write_custom(out, args.num_train or 40, args.num_test or 10, args.seed)
    elif args.task == "ucf101":
        write_ucf101(out, {"train": args.num_train or 4, "val": 1, "test": 1}, args.seed)
    else:
        write_cauldron(out, args.task, args.num_train or 700, args.seed)
    print(f"Wrote synthetic {args.task} data to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
