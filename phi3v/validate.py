"""Check a recipe's data without training: ``python -m phi3v.validate SCRIPT [that script's flags]``.

    python -m phi3v.validate finetune_hf_trainer_ucf101.py --data_dir ./ucf101
    python -m phi3v.validate docvqa --dataset_name_or_path ./docvqa --max_length 2048

SCRIPT is a recipe script's path or short name (docvqa, hateful_memes, nlvr2, ucf101, custom). Every sample
of both splits is checked as the recipe checks it before training (``phi3v.data.validation``): the row's
schema, UTF-8 and JSON, image paths inside the image folder, control tokens written in the text, every image
decoded, the length against --max_length. Problems are listed with their row or file:line; with
--skip_bad_samples the samples that would be skipped are listed instead. The result is cached, so the
training run that follows does not check again.
"""

from __future__ import annotations

import sys

from .args import parse_args
from .console import setup_logging
from .errors import command
from .task import load_sources, load_task, validate_task_data
from .training.loading import load_processor


@command
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    task = load_task(argv[0])
    args = parse_args(task.arguments, argv[1:], __doc__)
    setup_logging(is_main_process=True)
    processor = load_processor(args)
    train, held_out = load_sources(task, args)
    checked = validate_task_data(task, args, processor, train, held_out)
    for entry in checked.skipped:
        print(f"would skip {entry['where']}: {'; '.join(entry['problems'])}")
    print(
        f"OK: {len(checked.train_rows)} training and {len(checked.eval_rows)} evaluation samples pass"
        + (f", {len(checked.skipped)} would be skipped" if checked.skipped else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
