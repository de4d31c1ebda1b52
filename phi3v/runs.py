"""One table of a sweep's runs: the flags that differ, the metric before and after, loss, speed, time.

    python -m phi3v.runs runs/                       # every run folder below runs/ (two levels deep)
    python -m phi3v.runs runs/lr1e-4 runs/lr2e-4     # these runs
    python -m phi3v.runs runs/ --csv > sweep.csv

A run folder is one a recipe wrote (``run_args.json`` and ``metrics.json``). Runs are sorted by the metric
after training, best first; a run that has not finished shows what it has.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

# Flags that name where a run is, not what it does.
NOT_COMPARED = {"output_dir", "resume_from_checkpoint", "overwrite_output_dir", "no_tqdm", "report_to"}


def find_runs(paths: list[Path]) -> list[Path]:
    runs = []
    for path in paths:
        if (path / "run_args.json").is_file():
            runs.append(path)
        else:
            runs += sorted({p.parent for p in [*path.glob("*/run_args.json"), *path.glob("*/*/run_args.json")]})
    return runs


def run_row(run: Path) -> dict[str, Any]:
    flags = json.loads((run / "run_args.json").read_text())["flags"]
    metrics_file = run / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return {"run": str(run), "flags": flags, **metrics}


def differing_flags(rows: list[dict[str, Any]]) -> list[str]:
    names = sorted({name for row in rows for name in row["flags"]} - NOT_COMPARED)
    return [name for name in names if len({json.dumps(row["flags"].get(name)) for row in rows}) > 1]


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    flags = differing_flags(rows)
    metric = next((row["metric"] for row in rows if row.get("metric")), "metric")
    header = ["run", *flags, f"{metric} before", f"{metric} after", "final loss", "images/s", "train time (s)"]
    ordered = sorted(rows, key=lambda row: (row.get("after") is None, -(row.get("after") or 0.0)))
    body = [
        [
            row["run"],
            *[_cell(row["flags"].get(flag)) for flag in flags],
            _cell(row.get("before")),
            _cell(row.get("after")),
            _cell(row.get("final_loss")),
            _cell(row.get("train_images_per_second")),
            _cell(row.get("train_runtime_s")),
        ]
        for row in ordered
    ]
    return header, body


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, or folders holding them")
    parser.add_argument("--csv", action="store_true", help="comma-separated values instead of a text table")
    args = parser.parse_args(argv)
    runs = find_runs(args.paths)
    if not runs:
        print(f"error: no run folder (with run_args.json) in {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 1
    header, body = table([run_row(run) for run in runs])
    if args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerows([header, *body])
        return 0
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    for line in [header, ["-" * width for width in widths], *body]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
