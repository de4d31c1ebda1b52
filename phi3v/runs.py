"""One table of a sweep's runs: the flags that differ, the metric before and after, loss, speed, time.

    python -m phi3v.runs runs/                       # every run folder below runs/ (two levels deep)
    python -m phi3v.runs runs/lr1e-4 runs/lr2e-4     # these runs
    python -m phi3v.runs runs/ --csv > sweep.csv

A run folder is one a recipe wrote (``run_args.json`` and ``metrics.json``). Runs are sorted by the metric
after training, best first; a run that has not finished shows what it has.
"""

from __future__ import annotations

import csv
import sys

from .args import parse_args
from .errors import RecipeError, command
from .hub import require_folder
from .program_args import RunsArguments
from .report import find_runs, run_row, table


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(RunsArguments, argv, __doc__)
    paths = [require_folder(path, "run folder") for path in args.paths]
    runs = find_runs(paths)
    if not runs:
        raise RecipeError(f"no run folder (with run_args.json) in {', '.join(map(str, paths))}")
    header, body = table([run_row(run) for run in runs])
    if args.csv:
        csv.writer(sys.stdout).writerows([header, *body])
        return 0
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    for line in [header, ["-" * width for width in widths], *body]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
