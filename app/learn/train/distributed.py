"""DDP set-up: which rank this process is, joining the process group ``torchrun``
describes, and leaving it again."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    """This process's place in the run: rank 0 of 1 without ``torchrun``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False  # this process created the group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def join_process_group() -> Ranks:
    """Joins the process group torchrun describes (WORLD_SIZE > 1), or one that exists."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, created=True)


def leave_process_group(ranks: Ranks) -> None:
    """Destroys the process group if :func:`join_process_group` created it."""
    if ranks.created:
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    """Waits for every rank (nothing to wait for on one)."""
    if ranks.enabled:
        dist.barrier()
