"""Guards against runs that fail silently: a loss that stopped being a number, a trainable part of the model
whose gradient is exactly zero, a sample that became unreadable (a run with nothing trainable is refused by
``phi3v.training.parts.trainable_parameter_table``).

- ``LossGuard``: the loss of every micro-batch is checked (on the device, one sync per optimizer step);
  after ``NONFINITE_PATIENCE`` optimizer steps in a row with a non-finite loss the run stops, naming
  the steps and their samples.
- ``GradientWatch``: over the first ``WATCH_STEPS`` optimizer steps, warns about every trainable group
  whose gradient was exactly zero on every rank (an adapter that is not wired in, a frozen input).
- ``UnreadableSamples``: a training sample whose image cannot be read although it passed validation (the
  file changed on disk) stops the run naming it, or with --skip_bad_samples is skipped and listed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..distributed import any_rank, gathered
from ..errors import RecipeError, SharedError
from .parts import parameter_group

logger = logging.getLogger(__name__)

NONFINITE_PATIENCE = 3
WATCH_STEPS = 5
MAX_ROWS_SHOWN = 10


class LossGuard(TrainerCallback):
    """Stops the run after NONFINITE_PATIENCE optimizer steps in a row whose loss was nan or inf."""

    def __init__(self, describe_row: Callable[[int], str]):
        self.describe_row = describe_row
        self.step_nonfinite: torch.Tensor | None = None
        self.step_rows: list[int] = []
        self.streak: list[tuple[int, list[int]]] = []

    def observe(self, loss: torch.Tensor, rows: list[int]) -> None:
        """Called for every micro-batch; stays on the device (no synchronisation)."""
        nonfinite = ~torch.isfinite(loss.detach())
        self.step_nonfinite = nonfinite if self.step_nonfinite is None else self.step_nonfinite | nonfinite
        self.step_rows += rows

    def on_step_end(self, args, state, control, **kwargs):
        nonfinite = self.step_nonfinite is not None and self.step_nonfinite
        if bool(any_rank(nonfinite)):
            self.streak.append((state.global_step, gathered(self.step_rows)))
            if len(self.streak) >= NONFINITE_PATIENCE:
                raise SharedError(self._message())  # every rank sees the same streak
        else:
            self.streak = []
        self.step_nonfinite, self.step_rows = None, []
        return control

    def _message(self) -> str:
        steps = ", ".join(str(step) for step, _ in self.streak)
        rows = sorted({row for _, step_rows in self.streak for row in step_rows})
        shown = "\n  ".join(self.describe_row(row) for row in rows[:MAX_ROWS_SHOWN])
        more = f"\n  ... and {len(rows) - MAX_ROWS_SHOWN} more" if len(rows) > MAX_ROWS_SHOWN else ""
        return (
            f"The training loss was not finite (nan or inf) at optimizer steps {steps}, so the run stopped. "
            f"The samples of those steps:\n  {shown}{more}\n"
            "Lower --learning_rate, train in bf16 rather than fp16 (--bf16), check these samples and the "
            "checkpoint the run started from; a complete checkpoint written before is still there to resume from."
        )


class GradientWatch(TrainerCallback):
    """Warns about trainable groups whose gradient stayed exactly zero over the first WATCH_STEPS steps."""

    def __init__(self, model: torch.nn.Module, steps: int = WATCH_STEPS):
        self.steps_left = steps
        self.groups: list[str] = []
        self.seen_nonzero: dict[str, torch.Tensor] = {}
        self.hooks = []
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                group = parameter_group(name)
                if group not in self.groups:
                    self.groups.append(group)
                self.hooks.append(parameter.register_hook(partial(self._record, group)))

    def _record(self, group: str, grad: torch.Tensor) -> None:
        nonzero = grad.ne(0).any()
        seen = self.seen_nonzero.get(group)
        self.seen_nonzero[group] = nonzero if seen is None else seen | nonzero.to(seen.device)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_left -= 1
        if self.steps_left == 0:
            self._report(state.global_step)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.hooks:  # fewer steps than the watch covers
            self._report(state.global_step)
        return control

    def _report(self, step: int) -> None:
        local = torch.tensor([bool(self.seen_nonzero.get(group, False)) for group in self.groups])
        for group, nonzero in zip(self.groups, any_rank(local).tolist()):
            if not nonzero:
                logger.warning(
                    "The gradient of %s was exactly zero in every step so far (%d): it is not learning. Check "
                    "that its inputs reach it (images in the data, adapters wired in) and the learning rate.",
                    group,
                    step,
                )
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


class UnreadableSamples(TrainerCallback):
    """Training samples that could not be read (``phi3v.data.TrainingSamples`` marks them): the run stops
    naming the first, or with ``skip`` each is skipped (it trains nothing), logged, appended to ``listing``
    (skipped_samples.jsonl) by its rank, and the total is logged at the end of training."""

    def __init__(self, skip: bool, listing: Path):
        self.skip, self.listing, self.skipped = skip, Path(listing), 0

    def observe(self, unreadable: list[dict], step: int) -> None:
        if not unreadable:
            return
        if not self.skip:
            first = unreadable[0]
            raise RecipeError(
                f"Training sample {first['where']} cannot be read: {first['problem']} Restore the file and resume. "
                "To drop such samples instead, resume with --skip_bad_samples --ignore_data_change (the samples "
                "dropped change the data the run goes on with)."
            )
        with open(self.listing, "a") as listing:
            for entry in unreadable:
                logger.warning("--skip_bad_samples: skipped %s at step %d: %s", entry["where"], step, entry["problem"])
                record = {"split": "train", "row": entry["row"], "where": entry["where"], "step": step}
                listing.write(json.dumps({**record, "problems": [entry["problem"]]}) + "\n")
        self.skipped += len(unreadable)

    def on_train_end(self, args, state, control, **kwargs):
        total = sum(gathered([self.skipped]))
        if total and state.is_world_process_zero:
            logger.warning("%d training sample(s) could not be read during training and were skipped "
                           "(--skip_bad_samples); they are listed in %s", total, self.listing)  # fmt: skip
        return control
