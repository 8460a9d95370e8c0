"""Data-parallel runs: the same recipe under ``torchrun`` (gloo on CPU, NCCL on CUDA) without code changes.

:func:`context` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (set by ``torchrun``) and
joins the process group once, with the backend the device needs: ``nccl`` when the run's
device is CUDA (each rank on ``cuda:LOCAL_RANK``), ``gloo`` on the CPU. The recipes then

* shard the training data with a ``DistributedSampler`` and average gradients with DDP,
* shard validation without padding and all-reduce the correct/total counts, so every rank
  sees the same accuracy and takes the same stop/keep decisions,
* make pruning decisions on rank 0 only and broadcast the plan JSON, which every other rank
  applies to its (identical) model,
* broadcast rank 0's parameters and buffers after every training stage (BatchNorm running
  statistics are per rank under DDP), so every rank ends bit-identical,
* write checkpoints and logs on rank 0 only, with a barrier after each write.

Without those variables everything is a no-op and the recipe runs in one process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Subset
from torch.utils.data.distributed import DistributedSampler

from .device import DeviceLoader

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a data-parallel run.

    Attributes:
        rank: this process's index, 0 for a single-process run.
        world_size: number of processes, 1 for a single-process run.
    """

    rank: int = 0
    world_size: int = 1
    launched: bool = False

    @property
    def enabled(self) -> bool:
        """True when a process group is joined: several processes, or ``torchrun`` with one."""
        return self.world_size > 1 or self.launched

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and makes pruning decisions."""
        return self.rank == 0


def backend_for(device: torch.device) -> str:
    """The process-group backend for ``device``: ``"nccl"`` on CUDA, ``"gloo"`` elsewhere.

    Example:
        >>> backend_for(torch.device("cpu")), backend_for(torch.device("cuda", 0))
        ('gloo', 'nccl')
    """
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for a CUDA run under ``torchrun``, else ``device``.

    Example:
        >>> rank_device(torch.device("cpu"))
        device(type='cpu')
    """
    if device.type != "cuda" or "LOCAL_RANK" not in os.environ:
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def context(device: torch.device | str = "cpu") -> DistContext:
    """The run's context from ``RANK`` / ``WORLD_SIZE``; joins a process group if needed.

    Args:
        device: the run's device; CUDA selects the ``nccl`` backend and binds this process to
            ``cuda:LOCAL_RANK``, anything else ``gloo``.

    Example:
        >>> context().world_size  # outside torchrun
        1
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ and not dist.is_initialized():
        return DistContext()  # a plain process (torchrun always sets TORCHELASTIC_RUN_ID)
    where = rank_device(torch.device(device))
    if where.type == "cuda":
        torch.cuda.set_device(where)  # NCCL collectives and broadcast_object_list use the current device
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(where))
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), launched=True)


def _collective_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in a single process).

    Example:
        >>> barrier(DistContext())
    """
    if ctx.enabled:
        dist.barrier()


def on_main(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and give its (picklable) result to every rank.

    Example:
        >>> on_main(DistContext(), lambda: 41 + 1)
        42
    """
    if not ctx.enabled:
        return fn()
    box: list[Any] = [fn() if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_state_(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Copy rank 0's parameters and buffers to every rank, in place.

    Example:
        >>> sync_state_(torch.nn.Linear(2, 2), DistContext()).out_features
        2
    """
    if ctx.enabled:
        with torch.no_grad():
            for tensor in model.state_dict(keep_vars=True).values():
                dist.broadcast(tensor.data, src=0)
    return model


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64).

    Example:
        >>> all_reduce_sum([1.0, 2.0], DistContext())
        [1.0, 2.0]
    """
    if not ctx.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def train_shard(loader: DataLoader, ctx: DistContext, seed: int) -> DataLoader:
    """This rank's share of the training batches (``DistributedSampler``); the loader itself if alone.

    Call ``loader.sampler.set_epoch(epoch)`` each epoch for a fresh, rank-consistent shuffle.

    Example:
        >>> loader = DataLoader(list(range(8)), batch_size=2)
        >>> train_shard(loader, DistContext(), seed=0) is loader
        True
    """
    if not ctx.enabled:
        return loader
    if isinstance(loader, DeviceLoader):
        return DeviceLoader(train_shard(loader.loader, ctx, seed), loader.placement)
    sampler = DistributedSampler(loader.dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                 shuffle=isinstance(loader.sampler, RandomSampler), seed=seed)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, drop_last=loader.drop_last)


def eval_shard(loader: DataLoader, ctx: DistContext) -> DataLoader:
    """Every ``world_size``-th sample from ``rank`` on: disjoint shards, no padding, so counts add up exactly.

    Example:
        >>> loader = DataLoader(list(range(5)), batch_size=2)
        >>> eval_shard(loader, DistContext()) is loader
        True
    """
    if not ctx.enabled:
        return loader
    if isinstance(loader, DeviceLoader):
        return DeviceLoader(eval_shard(loader.loader, ctx), loader.placement)
    indices = list(range(ctx.rank, len(loader.dataset), ctx.world_size))
    return DataLoader(Subset(loader.dataset, indices), batch_size=loader.batch_size, shuffle=False,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn)
