"""What a run did, written beside its model: ``run_args.json``, ``metrics.json`` and ``training_report.png``.

- ``run_args.json`` (at start): every flag, the command line, the world size and the versions, so a
  sweep's runs can be compared (``python -m phi3v.runs``) and any run repeated.
- ``metrics.json``: the loss, learning rate and gradient norm of every logged step (rewritten at each log,
  so a run that dies keeps them), each evaluation during training and the best so far, then the evaluation
  before and after (and ``model_step``, the step whose model was evaluated after), the run time and the speed.
- ``training_report.png``: loss and learning rate per step, and the metric before, during and after training.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from accelerate import PartialState
from transformers import TrainerCallback

from .args import RecipeArguments

STEP_KEYS = ("loss", "learning_rate", "grad_norm")
# Flags that name where a run is, not what it does: not compared between runs.
NOT_COMPARED = {"output_dir", "resume_from_checkpoint", "overwrite_output_dir", "no_tqdm", "report_to"}


def package_version() -> str:
    from importlib.metadata import version

    return version("phi3v")


def write_run_args(args: RecipeArguments, output_dir: Path) -> None:
    state = PartialState()
    model = Path(args.model_name_or_path)
    record = {
        "flags": asdict(args),
        "model_folder": str(model.resolve()) if model.is_dir() else None,  # a relative path, made absolute
        "command": shlex.join([sys.executable, *sys.argv]),
        "world_size": state.num_processes,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {
            "phi3v": package_version(),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
    }
    (output_dir / "run_args.json").write_text(json.dumps(record, indent=2) + "\n")


def step_records(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per logged optimizer step (the Trainer's summary entry at the end is not one)."""
    return [
        {"step": entry["step"], "epoch": entry.get("epoch"), **{key: entry.get(key) for key in STEP_KEYS}}
        for entry in log_history
        if "loss" in entry
    ]


def evaluation_records(log_history: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One record per evaluation during training: ``{"step", "epoch", metric, "samples"}``, with "loss"
    (--eval_loss) and "auroc" (Hateful Memes) when they were logged."""
    key = f"eval_{metric}"
    return [
        {
            "step": entry["step"],
            "epoch": entry.get("epoch"),
            metric: entry[key],
            **{name: entry[f"eval_{name}"] for name in ("loss", "auroc") if f"eval_{name}" in entry},
            "samples": entry.get("eval_samples"),
        }
        for entry in log_history
        if key in entry
    ]


class MetricsCallback(TrainerCallback):
    """Keeps metrics.json up to date with every log line, on the main process."""

    def __init__(self, output_dir: Path, images_per_sample: float, metric: str = "none"):
        self.output_dir = output_dir
        self.images_per_sample = images_per_sample
        self.metric = metric
        self.log_history: list[dict[str, Any]] = []
        self.train_summary: dict[str, Any] = {}
        self.last_step = 0  # the optimizer step training ended at

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.log_history = list(state.log_history)
        if "train_runtime" in (logs or {}):
            self.train_summary = {
                "train_runtime_s": logs["train_runtime"],
                "train_samples_per_second": logs["train_samples_per_second"],
                "train_images_per_second": logs["train_samples_per_second"] * self.images_per_sample,
            }
        if state.is_world_process_zero:
            records = {"steps": step_records(self.log_history), **self.train_summary}
            evaluations = evaluation_records(self.log_history, self.metric)
            update_metrics(self.output_dir, **records, **({"evaluations": evaluations} if evaluations else {}))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.last_step = state.global_step
        return control


def update_metrics(output_dir: Path, **values: Any) -> dict[str, Any]:
    """Merge ``values`` into metrics.json (atomically: a reader never sees half a file)."""
    path = Path(output_dir) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    metrics.update(values)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(metrics, indent=2) + "\n")
    partial.replace(path)
    return metrics


def plot_report(output_dir: Path) -> Path:
    """training_report.png from metrics.json."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    metrics = json.loads((Path(output_dir) / "metrics.json").read_text())
    steps = metrics.get("steps", [])
    figure, (loss_axis, lr_axis, metric_axis) = plt.subplots(1, 3, figsize=(15, 4), width_ratios=[3, 3, 2])
    loss_axis.plot([s["step"] for s in steps], [s["loss"] for s in steps], color="tab:blue", label="training")
    validation = [e for e in metrics.get("evaluations", []) if "loss" in e]
    if validation:
        loss_axis.plot([e["step"] for e in validation], [e["loss"] for e in validation], "o-", color="tab:green",
                       label="validation")  # fmt: skip
        loss_axis.legend(loc="upper right", fontsize="small")
    loss_axis.set(title="training loss", xlabel="optimizer step")
    lr_axis.plot([s["step"] for s in steps], [s["learning_rate"] for s in steps], color="tab:orange")
    lr_axis.set(title="learning rate", xlabel="optimizer step")
    name = metrics.get("metric", "metric")
    _draw_metric(metric_axis, metrics, name)
    figure.suptitle(f"{Path(output_dir).resolve().name}: {metrics.get('train_images_per_second', 0):.2f} images/s")
    figure.tight_layout()
    path = Path(output_dir) / "training_report.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _draw_metric(axis, metrics: dict[str, Any], name: str) -> None:
    """The metric before training (step 0), at each evaluation during training, and after training (at the
    step whose model was evaluated)."""
    evaluations = metrics.get("evaluations", [])
    last_step = metrics.get("model_step") or max([s["step"] for s in metrics.get("steps", [])], default=1)
    if evaluations:
        axis.plot([e["step"] for e in evaluations], [e[name] for e in evaluations], "o-", color="tab:green",
                  label="during training")  # fmt: skip
    for label, step, score, color in (("before", 0, metrics.get("before"), "tab:gray"),
                                      ("after", last_step, metrics.get("after"), "tab:red")):  # fmt: skip
        if score is not None:
            axis.plot([step], [score], "s", color=color, label=label)
            axis.annotate(f"{score:.3f}", (step, score), textcoords="offset points", xytext=(0, 6), ha="center")
    axis.set(title=name, xlabel="optimizer step", ylim=(0, 1.05))
    axis.legend(loc="lower right", fontsize="small")


def find_runs(paths: list[Path]) -> list[Path]:
    runs = []
    for path in paths:
        if (path / "run_args.json").is_file():
            runs.append(path)
        else:
            runs += sorted({p.parent for p in [*path.glob("*/run_args.json"), *path.glob("*/*/run_args.json")]})
    unique: dict[Path, Path] = {}
    for run in runs:
        unique.setdefault(run.resolve(), run)  # a run named twice (runs/ and runs/a) is one row
    return list(unique.values())


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
    selected = next((row["best"]["metric"] for row in rows if row.get("best")), None)  # runs evaluating in training
    best_columns = [f"best {selected}", "best step"] if selected else []
    header = ["run", *flags, f"{metric} before", *best_columns, f"{metric} after", "final loss", "images/s",
              "train time (s)"]  # fmt: skip
    ordered = sorted(rows, key=lambda row: (row.get("after") is None, -(row.get("after") or 0.0)))
    body = [
        [
            row["run"],
            *[_cell(row["flags"].get(flag)) for flag in flags],
            _cell(row.get("before")),
            *(
                [_cell((row.get("best") or {}).get("score")), _cell((row.get("best") or {}).get("step"))]
                if selected
                else []
            ),  # fmt: skip
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
