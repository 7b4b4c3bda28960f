"""The few ``torch.distributed`` pieces training and evaluation need; every function also works (as a no-op or
the trivial answer) in a single process.

Launched under ``torchrun`` (``WORLD_SIZE > 1``), :func:`setup_distributed` initialises the process group
(NCCL on CUDA, gloo on CPU) unless the caller already did, and picks ``cuda:LOCAL_RANK`` on CUDA.
"""

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["unwrap", "dist_info", "setup_distributed", "barrier", "agree", "all_gather", "all_reduce"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _resolve_device(spec: str, local_rank: int, distributed: bool) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device is {spec!r} but CUDA is not available")
        if distributed and device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def setup_distributed(spec: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call created the process group) for device ``spec``."""
    owns = False
    if not (dist.is_available() and dist.is_initialized()):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            device = _resolve_device(spec, local_rank, True)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            owns = True
    rank, world = dist_info()
    device = _resolve_device(spec, int(os.environ.get("LOCAL_RANK", "0")), world > 1)
    return rank, world, device, owns


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def agree(ok: bool, world: int) -> bool:
    """True when ``ok`` holds on every rank (so all ranks raise, or stop, together and none hangs)."""
    if world == 1:
        return ok
    t = torch.tensor([0 if ok else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return int(t.item()) == 0


def all_gather(obj: Any, world: int) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects) on every rank."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    """The sum of ``t`` over ranks (a new tensor on ``t``'s device; NCCL reduces on the GPU)."""
    if world == 1:
        return t
    red = t if dist.get_backend() != "nccl" or t.is_cuda else t.cuda()
    red = red.clone() if red is t else red
    dist.all_reduce(red)
    return red.to(t.device)
