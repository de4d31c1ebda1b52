"""Launching the recipe scripts as a user would (one process, or torchrun with CPU ranks over gloo), and
the synthetic datasets they run on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convert_ucf101 import convert
from phi3v.data.synthetic import write_cauldron, write_docvqa, write_ucf101
from tests.conftest import REPO


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    write_docvqa(root / "docvqa", num_train=16, num_test=6)
    for config in ("hateful_memes", "nlvr2"):
        write_cauldron(root / config, config, num_rows=24)
    write_ucf101(root / "videos", {"train": 1, "val": 1, "test": 1})
    (root / "ucf101").mkdir()
    convert(root / "videos" / "UCF101_subset", root / "ucf101", show_progress=False)
    return {name: root / name for name in ("docvqa", "hateful_memes", "nlvr2", "ucf101")}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def recipe_command(script: str, flags: list[str], ranks: int = 1) -> list[str]:
    if ranks == 1:
        return [sys.executable, script, *flags]
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}"]
    return [*torchrun, f"--master_port={free_port()}", script, *flags]


def recipe_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def launch(script: str, flags: list[str], ranks: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a recipe to the end; it must succeed."""
    command = recipe_command(script, flags, ranks)
    result = subprocess.run(command, cwd=REPO, env=recipe_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
    assert f" over {ranks} process(es)" in result.stderr  # the Trainer saw every rank (DeepSpeed: one or more)
    return result


def launch_failing(script: str, flags: list[str], ranks: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a recipe that must stop with an error."""
    command = recipe_command(script, flags, ranks)
    result = subprocess.run(command, cwd=REPO, env=recipe_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode != 0, f"{' '.join(command)} succeeded:\n{result.stderr[-3000:]}"
    return result


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_until(condition, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (status {process.returncode}) before the test could interrupt it:\n"
                        f"{log.read_text()[-3000:]}")  # fmt: skip
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def kill_everything(process: subprocess.Popen) -> None:
    """SIGKILL the launcher, its ranks and their dataloader workers at once: a machine that died."""
    for pid in [*descendants(process.pid), process.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
