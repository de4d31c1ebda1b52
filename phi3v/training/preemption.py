"""Graceful preemption: on SIGTERM or SIGINT, finish the optimizer step, write a checkpoint, exit non-zero.

Cloud schedulers and Slurm send SIGTERM (Ctrl-C sends SIGINT) some time before they kill a job. The
first signal only sets a flag; after the current optimizer step every rank learns whether any rank got
one, and all of them save the same checkpoint and stop. A second signal exits at once. Signals that
arrive together (Ctrl-C reaches every process of the terminal and torchrun forwards it as well) count
as one.

torchrun gives its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) after forwarding a
signal before it kills them; raise it if writing a checkpoint takes longer.
"""

from __future__ import annotations

import os
import signal
import time

from transformers import TrainerCallback

from ..data.collators import STOP_SIGNALS
from ..distributed import any_rank

SAME_SIGNAL_WINDOW_S = 2.0  # a repeat within this window is the same request delivered twice


class StopRequest:
    """Remembers the first stop signal; a later, separate one ends the process at once."""

    def __init__(self, announce: bool = True):
        self.announce = announce  # say so on the console (the main process only, not every rank)
        self.signal: int | None = None
        self.stopped_at_step: int | None = None  # set when training stopped for it, with a checkpoint
        self.failed = False  # the run failed: nothing is left to finish, a signal ends the process at once
        self.reporting = False  # ... but not before the failure's message is written
        self._held: int | None = None  # a signal that came while it was
        self._received_at = 0.0

    def install(self) -> StopRequest:
        for number in STOP_SIGNALS:
            signal.signal(number, self._handle)
        return self

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal or 0)  # the shell's convention for "ended by signal N"

    def abandon(self) -> None:
        """The run failed and its message is being written: a stop signal waits for it. torchrun stops every rank
        the moment one exits, which would otherwise cut short the other ranks' lines (the process exits right
        after them, and within EXIT_DEADLINE_S in any case)."""
        self.failed = self.reporting = True

    def reported(self) -> None:
        """The failure's message is written: a signal held meanwhile, and any later one, ends the process at once
        (no step will finish, and the cleanup left may hang)."""
        self.reporting = False
        if self._held is not None:
            self._end_after_failure(self._held)

    def _handle(self, number: int, frame) -> None:
        now = time.monotonic()
        if self.reporting:
            self._held = number
        elif self.failed:
            self._end_after_failure(number)
        elif self.signal is None:
            self.signal, self._received_at = number, now
            if not self.announce:
                return
            # os.write, not logging: a handler may interrupt a logging call holding its lock
            os.write(2, f"\n{signal.Signals(number).name} received: finishing this step, then writing a "
                        "checkpoint. Send it again to stop at once.\n".encode())  # fmt: skip
        elif now - self._received_at > SAME_SIGNAL_WINDOW_S:
            self._end_now(number)

    def _end_after_failure(self, number: int) -> None:
        os.write(2, f"\n{signal.Signals(number).name} received while the run stops after an error: exiting "
                    "now.\n".encode())  # fmt: skip
        self._end_now(number)

    @staticmethod
    def _end_now(number: int) -> None:
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)


class PreemptionCallback(TrainerCallback):
    """After each optimizer step: if any rank was asked to stop, all save a checkpoint and stop."""

    def __init__(self, request: StopRequest):
        self.request = request

    def on_step_end(self, args, state, control, **kwargs):
        if bool(any_rank(self.request.signal is not None)):
            control.should_save = True
            control.should_training_stop = True
            self.request.stopped_at_step = state.global_step
        return control
