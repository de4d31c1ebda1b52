"""The few collective operations the recipe needs beyond the Trainer's, all no-ops in a single process.

Decisions that change control flow (stop after this step, refuse to start, reuse a cached result) are
taken once and shared, so every rank takes the same branch and none waits forever in a collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from accelerate import PartialState


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
