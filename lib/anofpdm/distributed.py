"""The process's place in a (possibly one-process) torchrun job, shared by training and evaluation.

Launched by ``torchrun``, each process reads WORLD_SIZE / RANK / LOCAL_RANK, takes its GPU and joins the
process group (NCCL on CUDA, else gloo); launched alone, it is rank 0 of 1 and nothing is initialised.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from anofpdm.runtime import default_device

__all__ = ["Distributed", "broadcast_from_main", "choose_device", "distributed_context", "gather_to_main"]


@dataclass(frozen=True)
class Distributed:
    """This process's place in a (possibly one-process) DistributedDataParallel job."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def choose_device(requested: str | None, local_rank: int) -> torch.device:
    """The device ``requested``, by default :func:`anofpdm.runtime.default_device`; a bare ``"cuda"`` is
    ``cuda:local_rank``.

    Raises:
        ValueError: a CUDA device is requested where CUDA is not available.
    """
    device = torch.device(requested or default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


@contextmanager
def distributed_context(device: str | None) -> Iterator[Distributed]:
    """Join the torchrun job described by WORLD_SIZE / RANK / LOCAL_RANK, if any (NCCL on CUDA, else gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = choose_device(device, local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    started_here = world_size > 1 and not dist.is_initialized()
    if started_here:
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    try:
        yield Distributed(rank=rank, world_size=world_size, device=chosen)
    finally:
        if started_here:
            dist.destroy_process_group()


def gather_to_main(local: list[Any], world_size: int, is_main: bool) -> list[Any]:
    """Every rank's list, concatenated on rank 0 (``[]`` elsewhere)."""
    if world_size == 1:
        return local
    parts: list[Any] | None = [None] * world_size if is_main else None
    dist.gather_object(local, parts, dst=0)
    return [item for part in parts for item in part] if is_main else []


def broadcast_from_main(value: Any, world_size: int) -> Any:
    """Rank 0's ``value`` on every rank."""
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
