"""The recipe's own collectives: no-ops in one process, shared decisions and a bounded wait across ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import phi3v.distributed as distributed
from phi3v.distributed import (
    any_rank,
    barrier,
    decided_on_main,
    from_main_process,
    gathered,
    is_distributed,
    set_collective_timeout,
)
from phi3v.errors import RecipeError, SharedError


@pytest.fixture(autouse=True)
def _no_process_group():
    if dist.is_initialized():  # left by an earlier test of the session: these tests need a process without one
        pytest.skip("a process group started by an earlier test is still open")
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_one_process_is_not_distributed():
    assert is_distributed() is False


def test_values_are_returned_as_they_are_in_one_process():
    value = {"cached": [1, 2]}
    assert from_main_process(value) is value
    values = [3, 1, 2]
    assert gathered(values) == [3, 1, 2]
    assert not dist.is_initialized()  # nothing started a process group


def test_any_rank_is_the_flags_themselves_as_a_cpu_bool_tensor():
    assert any_rank(True).dtype == torch.bool and any_rank(True).item() is True
    assert any_rank(False).item() is False
    flags = any_rank(torch.tensor([1, 0, 1]))
    assert flags.dtype == torch.bool and flags.device.type == "cpu" and flags.tolist() == [True, False, True]


def test_barrier_and_the_timeout_do_nothing_without_a_process_group(monkeypatch):
    def collective(*args, **kwargs):
        raise AssertionError("no collective without a process group")

    monkeypatch.setattr(dist, "barrier", collective)
    monkeypatch.setattr(dist, "set_timeout", collective)
    barrier()
    set_collective_timeout(5)
    assert not dist.is_initialized()


def test_a_decision_is_taken_once_and_returned():
    calls = []

    def decide():
        calls.append(1)
        return ("resume", 12)

    assert decided_on_main(decide) == ("resume", 12)
    assert calls == [1]


@pytest.mark.parametrize("error", [RecipeError("--save_steps 0: must be at least 1"), KeyError("a bug")])
def test_an_error_on_the_main_process_propagates_itself(error):
    def decide():
        raise error

    with pytest.raises(type(error)) as raised:
        decided_on_main(decide)
    assert raised.value is error and not isinstance(raised.value, SharedError)  # the main process's own error


def test_the_timeout_is_set_on_an_existing_process_group(monkeypatch, tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    asked = []
    real = dist.set_timeout
    monkeypatch.setattr(dist, "set_timeout", lambda timeout: (asked.append(timeout), real(timeout)))
    set_collective_timeout(90)
    assert asked == [timedelta(seconds=90)]
    assert is_distributed() is False  # one rank: still the single-process paths
    assert from_main_process("x") == "x" and gathered([1]) == [1]


# --- two ranks ----------------------------------------------------------------------------------------------

# Each rank imports only phi3v.distributed and phi3v.errors (not the package's model code), to start in seconds.
WORKER = r"""
import json, os, sys, time, types
from datetime import timedelta
from pathlib import Path

package = types.ModuleType("phi3v")
package.__path__ = [sys.argv[1]]
sys.modules["phi3v"] = package

import torch
import torch.distributed as dist
from accelerate import PartialState

from phi3v.distributed import (any_rank, barrier, decided_on_main, from_main_process, gathered, is_distributed,
                               set_collective_timeout)
from phi3v.errors import RecipeError

out = Path(sys.argv[2])
rank = int(os.environ["RANK"])
state = PartialState(cpu=True, backend="gloo", timeout=timedelta(seconds=60))  # as setup_distributed on a CPU
calls = []


def decide():
    calls.append(rank)
    return f"decided on rank {rank}"


def refuse():
    calls.append(rank)
    raise RecipeError("bad flag")


result = {
    "main": state.is_main_process,
    "distributed": is_distributed(),
    "from_main": from_main_process({"rank": rank}),
    "gathered": gathered([rank, 10 * rank]),
    "any": any_rank(torch.tensor([rank == 1, False])).tolist(),
    "decided": decided_on_main(decide),
}
try:
    decided_on_main(refuse)
except Exception as error:
    result["error"] = [type(error).__name__, str(error)]
result["calls"] = calls
barrier()
set_collective_timeout(2)
if rank == 0:  # rank 1 never joins this barrier: rank 0 must give up after 2 s, not the group's 60
    start = time.monotonic()
    try:
        dist.barrier()
    except RuntimeError as error:
        result["gave_up"] = [time.monotonic() - start, str(error)[:300]]
    (out / "done").touch()
else:  # stay in the group until rank 0 has given up, so that it times out rather than losing a peer
    deadline = time.monotonic() + 60
    while not (out / "done").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
(out / f"rank{rank}.json").write_text(json.dumps(result))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_ranks_share_decisions_values_and_a_bounded_wait(tmp_path):
    package = str(Path(distributed.__file__).parent)
    port = str(free_port())
    processes = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "OMP_NUM_THREADS": "1",
        }
        command = [sys.executable, "-c", WORKER, package, str(tmp_path)]
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    try:
        outputs = [process.communicate(timeout=120)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert [process.returncode for process in processes] == [0, 0], outputs
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2))

    assert (rank0["main"], rank1["main"]) == (True, False)
    for result in (rank0, rank1):
        assert result["distributed"] is True
        assert result["from_main"] == {"rank": 0}
        assert result["gathered"] == [0, 0, 1, 10]  # in rank order
        assert result["any"] == [True, False]  # rank 1's flag reaches rank 0
        assert result["decided"] == "decided on rank 0"
    assert rank0["calls"] == [0, 0] and rank1["calls"] == []  # only the main process decides
    assert rank0["error"] == ["RecipeError", "bad flag"]
    assert rank1["error"] == ["SharedError", "The main process stopped: RecipeError: bad flag"]
    waited, error = rank0["gave_up"]
    assert 1.5 < waited < 30, error
