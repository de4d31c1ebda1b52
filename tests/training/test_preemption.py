"""Stop signals: the first asks for a checkpoint and a clean stop, a separate second one ends at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from tests.conftest import REPO

SCRIPT = textwrap.dedent(
    """
    import os, signal, time
    from phi3v.training import preemption

    preemption.SAME_SIGNAL_WINDOW_S = 0.3
    request = preemption.StopRequest().install()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)  # arriving together (a terminal and a launcher): the same request
    time.sleep(0.6)
    print("still running, asked to stop by", request.name, "exit code", request.exit_code, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # a separate second signal
    time.sleep(10)
    print("not reached", flush=True)
    """
)


def test_first_signal_is_remembered_a_second_one_ends_the_process():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGTERM
    assert "still running, asked to stop by SIGTERM exit code 143" in result.stdout
    assert "not reached" not in result.stdout
    assert result.stderr.count("SIGTERM received: finishing this step, then writing a checkpoint") == 1
