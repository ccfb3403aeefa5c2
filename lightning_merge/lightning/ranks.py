"""Ranks: how the merge work is shared between DDP processes and every result reaches every rank.

:func:`split_tasks` deals the plan's tensors into ``world_size`` shares balanced by size; each rank
merges its share; :class:`Comm` then broadcasts each share from its owner in byte buckets
(:func:`buckets`, :func:`pack`, :func:`unpack`: 16-byte aligned views into one ``uint8`` buffer of
at most :data:`BUCKET_BYTES`). A rank that fails reports it through the collective its peers are
waiting in (:meth:`Comm.fail`), so no rank waits forever; peers raise :class:`PeerFailed`. Without an
initialized process group :class:`Comm` is a one-process stand-in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from ..engine import TensorTask

__all__ = ["BUCKET_BYTES", "Bucket", "Comm", "PeerFailed", "buckets", "pack", "split_tasks", "unpack"]

#: largest broadcast buffer when sharing merged tensors between ranks
BUCKET_BYTES = 128 * 1024 * 1024
_ALIGN = 16


def split_tasks(tasks: Sequence[TensorTask], world_size: int) -> list[list[TensorTask]]:
    """Deterministic greedy split into ``world_size`` shares balanced by numel.

    Largest tensors first (ties by name), each to the currently lightest share (ties: lowest
    rank); every share keeps the plan's order.
    """
    loads = [0] * world_size
    owner: dict[str, int] = {}
    for t in sorted(tasks, key=lambda t: (-t.numel, t.name)):
        r = min(range(world_size), key=lambda i: (loads[i], i))
        owner[t.name] = r
        loads[r] += max(t.numel, 1)
    return [[t for t in tasks if owner[t.name] == r] for r in range(world_size)]



@dataclass
class _Failed:
    rank: int
    message: str


class PeerFailed(Exception):
    def __init__(self, failed: _Failed):
        super().__init__(failed.message)
        self.failed = failed


class Comm:
    """The default process group, or a one-process stand-in."""

    def __init__(self, trainer: pl.Trainer | None = None):
        import torch.distributed as dist

        self.dist = dist
        self.on = (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
                   and (trainer is None or trainer.world_size > 1))
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        backend = str(dist.get_backend()) if self.on else ""
        # NCCL moves CUDA tensors only; gloo (CPU) moves CPU tensors
        if "nccl" in backend:
            self.device = trainer.strategy.root_device if trainer is not None else torch.device(
                "cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    def gather(self, obj: Any) -> list[Any]:
        """``all_gather_object``; raises :class:`PeerFailed` when a rank reported a failure."""
        if not self.on:
            return [obj]
        parts: list[Any] = [None] * self.world
        self.dist.all_gather_object(parts, obj)
        for p in parts:
            if isinstance(p, _Failed):
                raise PeerFailed(p)
        return parts

    def fail(self, message: str) -> None:
        """This rank's side of the collective its peers are waiting in: report the failure."""
        parts: list[Any] = [None] * self.world
        self.dist.all_gather_object(parts, _Failed(self.rank, message))

    def broadcast(self, buf: Tensor | None, nbytes: int, src: int) -> Tensor:
        """Broadcast a uint8 buffer from ``src``; returns it on CPU on every rank."""
        if self.rank == src:
            assert buf is not None
            dev = buf.to(self.device)
        else:
            dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.dist.broadcast(dev, src=src)
        return buf if self.rank == src else dev.cpu()


Bucket = tuple[list[tuple[TensorTask, int, int]], int]


def buckets(tasks: Sequence[TensorTask], limit: int = BUCKET_BYTES) -> list[Bucket]:
    """Pack tasks into byte buckets: ([(task, offset, nbytes)], total bytes); offsets 16-aligned."""
    out: list[Bucket] = []
    cur: list[tuple[TensorTask, int, int]] = []
    off = 0
    for t in tasks:
        nb = t.numel * t.out_dtype.itemsize
        if cur and off + nb > limit:
            out.append((cur, off))
            cur, off = [], 0
        cur.append((t, off, nb))
        off += -(-nb // _ALIGN) * _ALIGN
    if cur:
        out.append((cur, off))
    return out


def pack(bucket: Bucket, results: Mapping[str, Tensor]) -> Tensor:
    items, total = bucket
    buf = torch.empty(total, dtype=torch.uint8)
    for task, off, nb in items:
        if nb:
            buf[off:off + nb].copy_(results[task.name].reshape(-1).view(torch.uint8))
    return buf


def unpack(bucket: Bucket, buf: Tensor) -> dict[str, Tensor]:
    return {task.name: buf[off:off + nb].view(task.out_dtype).reshape(task.shape) for task, off, nb in bucket[0]}
