"""Multi-process training under torchrun: joining the process group, and the collectives the loop needs."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    """Whether this process is one of several ranks of an initialized process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_buffers(model: nn.Module) -> None:
    """Average the floating buffers (batch-norm statistics) over the ranks. DDP copies rank 0's buffers
    into every rank at each forward, but each rank's last forward updates its own: averaging before a
    checkpoint and at the end leaves every rank with the same model, using every rank's statistics."""
    if not is_distributed():
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(dist.get_world_size())


def max_over_ranks(value: float) -> float:
    """The largest ``value`` of all ranks, so time-based decisions agree everywhere."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())
