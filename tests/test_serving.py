"""The serving check (benchmarks/serve_check.py, which CI runs as `make serve-check` after the tests): its server
is always stopped, whole."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from serve_check import living_members, stop_server  # noqa: E402

# A stand-in server whose worker ignores SIGTERM, as a stuck engine process would.
STUBBORN = (
    "import signal, subprocess, sys, time\n"
    "worker = subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, "
    "signal.SIG_IGN); print(flush=True); time.sleep(600)'])\n"
    "time.sleep(600)\n"
)


def test_the_server_and_its_workers_are_stopped_even_when_they_ignore_sigterm():
    server = subprocess.Popen([sys.executable, "-c", STUBBORN], start_new_session=True)
    time.sleep(1.5)  # the worker is up
    assert len(living_members(server.pid)) == 2
    stop_server(server, grace_s=1)
    assert server.poll() is not None and not living_members(server.pid)
