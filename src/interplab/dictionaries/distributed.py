"""The few `torch.distributed` collectives dictionary training needs (all no-ops when
`torch.distributed` is not initialised, so single-process training takes the same path)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


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
