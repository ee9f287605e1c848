"""Data-parallel dictionary training with `torch.distributed`.

* The few collectives the trainer needs (all no-ops when `torch.distributed` is not
  initialised, so single-process training takes the same path).
* `launch`: the process group of a `torchrun` launch, set up from its environment
  (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): gloo on CPU, NCCL on CUDA with
  rank i on `cuda:LOCAL_RANK`; destroyed again on exit.
* `rank_shard`: this rank's share of a cached activation store (a contiguous 1/world of
  the rows of every shard file), so ranks read disjoint data.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from interplab.data.activations import ActivationStore
from interplab.errors import InterplabError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int
    size: int

    @property
    def distributed(self) -> bool:
        """True when there is more than one process."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, saves and shows progress."""
        return self.rank == 0


def current_world() -> World:
    """Rank and world size of the initialised process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World(0, 1)


def _collective_device(tensor: Tensor) -> torch.device:
    # gloo works on CPU tensors only; nccl on CUDA ones.
    backend = dist.get_backend()
    return tensor.device if backend != "gloo" else torch.device("cpu")


def all_reduce_(tensor: Tensor, world: World, op: str = "sum") -> Tensor:
    """In-place sum or max over ranks (returns `tensor`)."""
    if not world.distributed:
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    device = _collective_device(tensor)
    if device == tensor.device:
        dist.all_reduce(tensor, op=reduce_op)
    else:
        moved = tensor.to(device)
        dist.all_reduce(moved, op=reduce_op)
        tensor.copy_(moved)
    return tensor


def gather_rows(tensor: Tensor, world: World) -> Tensor:
    """Concatenate every rank's rows in rank order (all ranks get the result); every rank
    must pass the same number of rows."""
    if not world.distributed:
        return tensor
    device = _collective_device(tensor)
    local = tensor.to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(tensor.device)


def _average_(tensors: list[Tensor], world: World) -> None:
    """Average tensors over ranks in place with one collective (flattened into one buffer:
    many small all-reduces cost far more latency than one large one)."""
    if not world.distributed or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    all_reduce_(flat, world).div_(world.size)
    for tensor, chunk in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        tensor.copy_(chunk.view_as(tensor))


def average_gradients_(modules: list[nn.Module], world: World) -> None:
    """Replace every parameter gradient by its mean over ranks (missing ones count as 0)."""
    if not world.distributed:
        return
    grads = []
    for module in modules:
        for param in module.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
    _average_(grads, world)


def average_float_buffers_(modules: list[nn.Module], world: World) -> None:
    """Average floating-point buffers (e.g. BatchTopK's threshold) so ranks stay identical."""
    if not world.distributed:
        return
    _average_([b for m in modules for b in m.buffers() if b.is_floating_point()], world)


def broadcast_module_(module: nn.Module, world: World) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if not world.distributed:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        device = _collective_device(tensor)
        moved = tensor.data.to(device)
        dist.broadcast(moved, src=0)
        tensor.data.copy_(moved)


def barrier(world: World) -> None:
    """Wait for every rank (no-op in a single process)."""
    if world.distributed:
        dist.barrier()


# ---------------------------------------------------------------------------- torchrun
def launched_by_torchrun() -> bool:
    """True in a process started by `torchrun` (it sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """The device of the process with `local_rank` on its machine: None = `cuda:LOCAL_RANK`
    when CUDA is present, else CPU; "cuda" = `cuda:LOCAL_RANK`; "cpu" = CPU. An explicit
    "cuda:N" is refused: every rank would get the same GPU."""
    from interplab.models.loading import resolve_device

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        return resolve_device(device)  # raises its error for an invalid device string
    if parsed.type == "cuda":
        if parsed.index is not None:
            raise InterplabError(
                f"device {str(device)!r} names one GPU, but under torchrun each rank takes "
                "cuda:LOCAL_RANK; pass --device cuda (or no --device)."
            )
        return resolve_device(f"cuda:{local_rank}")
    return resolve_device(parsed)


@dataclass(frozen=True)
class Launch:
    """Where this process trains: its rank among the processes and its device."""

    world: World
    """Rank and world size ((0, 1) outside torchrun)."""
    device: torch.device
    """This rank's device."""


@contextmanager
def launch(device: str | torch.device | None = None) -> Iterator[Launch]:
    """Join the process group of a `torchrun` launch for the duration of the block.

    Under torchrun (more than one process) this calls `init_process_group` from the
    environment with the gloo backend on CPU or NCCL on CUDA (rank device `cuda:LOCAL_RANK`,
    see `rank_device`) and destroys the group on exit. A single process, or a group that is
    already initialised, is used as it is and left alone.
    """
    from interplab.models.loading import resolve_device

    if dist.is_available() and dist.is_initialized():
        world = current_world()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        resolved = rank_device(device, local_rank) if world.distributed else None
        yield Launch(world, resolved or resolve_device(device))
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1
    if world_size <= 1:
        yield Launch(World(0, 1), resolve_device(device))
        return
    if not dist.is_available():
        raise InterplabError("torch.distributed is not available in this torch build.")
    resolved = rank_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
        dist.init_process_group("nccl", device_id=resolved)
    elif resolved.type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise InterplabError(
            f"distributed training runs on CPU (gloo) or CUDA (NCCL), not on {str(resolved)!r}."
        )
    try:
        yield Launch(current_world(), resolved)
    finally:
        dist.destroy_process_group()


def broadcast_object(value: Any, world: World) -> Any:
    """Rank 0's `value` on every rank (a picklable Python object, e.g. a run folder path)."""
    if not world.distributed:
        return value
    box = [value if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------- data shards
def rank_rows(n_rows: int, world: World) -> tuple[int, int]:
    """The contiguous block [start, stop) of `n_rows` rows that `world.rank` owns (sizes
    differ by at most one row between ranks)."""
    return n_rows * world.rank // world.size, n_rows * (world.rank + 1) // world.size


def rank_shard(store: ActivationStore, world: World) -> ActivationStore:
    """This rank's part of a cached `ActivationStore`: rows `rank_rows(len(file), world)` of
    every shard file, so the ranks read disjoint rows that together cover the cache, and each
    reads 1/world of every file. Iterating the returned store (`batches`, shuffled or not) works
    as for the whole one: files in the same seeded order on every rank, rows shuffled through
    the usual buffer. A single process gets `store` itself."""
    if not world.distributed:
        return store
    return RankShard(store, world)


class RankShard(ActivationStore):
    """A cached store restricted to one rank's rows of each shard file (see `rank_shard`)."""

    def __init__(self, store: ActivationStore, world: World) -> None:
        manifest = store.manifest
        if store.folder is None or manifest is None:
            raise InterplabError(
                "rank_shard splits a cached activation store; a store that streams from the "
                "model is split by giving each rank its own token windows instead."
            )
        sizes = [
            min(manifest.shard_tokens, manifest.n_tokens - i * manifest.shard_tokens)
            for i in range(manifest.n_shards)
        ]
        n_rows = sum(stop - start for start, stop in (rank_rows(n, world) for n in sizes))
        super().__init__(
            list(store.hooks), dict(store.d), n_rows, folder=store.folder, manifest=manifest
        )
        self.world = world

    def shard(self, hook: str, index: int) -> np.ndarray:
        """This rank's rows of one shard file (a memory-map slice: only they are read)."""
        rows = super().shard(hook, index)
        start, stop = rank_rows(rows.shape[0], self.world)
        return rows[start:stop]
