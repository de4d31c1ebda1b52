"""The few collective operations the recipe needs beyond the Trainer's, all no-ops in a single process.

Decisions that change control flow (stop after this step, refuse to start, reuse a cached result) are
taken once and shared, so every rank takes the same branch and none waits forever in a collective.

A collective waits for the other ranks at most a timeout: ``LOADING_TIMEOUT`` while the model and data
load (rank 0 may be downloading them while the others wait), then --ddp_timeout, so that a rank that died
or hangs ends the run in minutes rather than after the 30 minutes torch waits by default.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from accelerate import PartialState

from .errors import SharedError

LOADING_TIMEOUT = timedelta(hours=2)


def set_collective_timeout(seconds: float) -> None:
    """From now on a collective of this process waits at most ``seconds`` for the others."""
    if dist.is_available() and dist.is_initialized():
        dist.set_timeout(timedelta(seconds=seconds))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def decided_on_main(decide: Callable[[], Any]) -> Any:
    """``decide()`` run on the main process, its result on every rank. When it raises, every rank raises too
    (the others a SharedError), so none waits for a broadcast that never comes."""
    if not PartialState().is_main_process:
        failed, value = from_main_process(None)
        if failed:
            raise SharedError(f"The main process stopped: {value}")
        return value
    try:
        value = decide()
    except Exception as error:
        from_main_process((True, f"{type(error).__name__}: {error}"))
        raise
    return from_main_process((False, value))[1]


def main_process_first(load: Callable[[], Any]) -> Any:
    """``load()`` on the main process, then, once it succeeded there, on the others (the main process may
    download, or write a cache the others read). When it fails there, every rank raises (the others a
    SharedError) instead of waiting for it."""
    if PartialState().is_main_process:
        try:
            value = load()
        except Exception as error:
            from_main_process(f"{type(error).__name__}: {error}")
            raise
        from_main_process(None)
        return value
    failure = from_main_process(None)
    if failure is not None:
        raise SharedError(f"The main process stopped: {failure}")
    return load()


def from_main_process(value: Any) -> Any:
    """The main process's ``value``, on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(values: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    if not is_distributed():
        return values
    per_rank: list[list | None] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, values)
    return [value for rank_values in per_rank for value in rank_values]


def any_rank(flags: torch.Tensor | bool) -> torch.Tensor:
    """Element-wise OR of a bool tensor (or one bool) over the ranks, as a CPU bool tensor."""
    flags = torch.as_tensor(flags, dtype=torch.bool)
    if not is_distributed():
        return flags.cpu()
    # NCCL reduces only tensors on the rank's GPU; gloo takes CPU tensors.
    reduced = flags.to(device=PartialState().device, dtype=torch.float32)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return reduced.cpu() > 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()
