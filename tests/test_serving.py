"""The serving check (benchmarks/serve_check.py, which CI runs as `make serve-check` after the tests): its server
is always stopped, whole; a failure says why in the check's own output."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, mounted_small_disk

sys.path.insert(0, str(REPO / "benchmarks"))
import serve_check  # noqa: E402
from serve_check import LOG_TAIL_LINES, CheckFailed, living_members, run, stop_server  # noqa: E402

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


def test_a_failed_step_shows_the_end_of_its_log(tmp_path):
    """CI shows only the check's output, not its logs: the failure carries the log's last lines."""
    noisy = "for n in range(40): print('line', n)\nraise SystemExit('the reason it failed')"
    with pytest.raises(CheckFailed) as failed:
        run([sys.executable, "-c", noisy], tmp_path / "step.log")
    tail = failed.value.log_tail
    assert "exited with 1" in str(failed.value) and tail[-1] == "the reason it failed"
    assert len(tail) == LOG_TAIL_LINES and tail[0] == f"line {40 - LOG_TAIL_LINES + 1}"


def test_a_disk_without_room_for_the_check_is_named_before_anything_is_written(tmp_path):
    with mounted_small_disk(tmp_path / "disk", "8m") as disk:
        ended = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_check.py"), "--work", str(disk)],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert list(disk.iterdir()) == []
    assert ended.returncode == 1
    last = ended.stdout.strip().splitlines()[-1]
    assert last.startswith(f"serving: FAILED (the disk holding {disk} has 0.0 GB free") and "--work" in last


def test_the_checks_last_line_is_its_result_with_the_failed_steps_log_above_it(tmp_path, monkeypatch, capsys):
    log = tmp_path / "export.log"
    log.write_text("loading\nTraceback (most recent call last):\nOSError: the cause\n")

    def failing_export(work):
        raise serve_check.failed_with_log("-m phi3v.export ... exited with 1", log)

    monkeypatch.setattr(serve_check, "require_disk_space", lambda work: None)
    monkeypatch.setattr(serve_check, "prepare_export", failing_export)
    monkeypatch.setattr(sys, "argv", ["serve_check.py", "--work", str(tmp_path)])
    assert serve_check.main() == 1
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-2] == "  | OSError: the cause"
    assert printed[-1].startswith("serving: FAILED (-m phi3v.export ... exited with 1") and str(tmp_path) in printed[-1]
