"""Process-group plumbing for training under torchrun: one device per process, per-rank seeds, averaged logs.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (the process's index on its node). On CUDA each
process must own ``cuda:LOCAL_RANK`` before anything touches the GPU, otherwise every rank allocates on
``cuda:0``; on the CPU the processes talk over gloo. Nothing here changes a single-process run.
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..errors import DeviceError, InvalidArgumentError

RANK_SEED_STREAM = 0x5EED_4A4B  # a seed word of its own: rank r's stream is never another run's seed


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_rank() -> int:
    """This process's index on its node (torchrun's ``LOCAL_RANK``); 0 outside torchrun."""
    return int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(device: torch.device) -> torch.device:
    """Join torchrun's process group (nccl on CUDA, gloo on the CPU) and return this rank's device.

    On CUDA the device is ``cuda:LOCAL_RANK`` and becomes the current device, so that a plain
    ``torch.device("cuda")`` also lands there. Outside torchrun ``device`` is returned unchanged.
    """
    if "RANK" not in os.environ:
        return device
    if device.type == "cuda":
        lr, local_world = local_rank(), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if device.index is not None and local_world > 1 and device.index != lr:
            raise InvalidArgumentError(
                f"--device {device} under torchrun with {local_world} processes per node: each process uses "
                "cuda:LOCAL_RANK; pass --device cuda"
            )
        if lr >= torch.cuda.device_count():
            raise DeviceError(
                f"process with LOCAL_RANK {lr} has no GPU of its own ({torch.cuda.device_count()} visible); "
                "start at most as many processes per node as GPUs"
            )
        device = torch.device("cuda", lr)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random draws (dropout, class dropout, noise), distinct per rank and run."""
    return int(np.random.SeedSequence([int(seed), int(rank), RANK_SEED_STREAM]).generate_state(1, np.uint32)[0])


def seed_rank(seed: int, rank: int) -> None:
    """Seed torch (CPU and CUDA), numpy and ``random`` with :func:`rank_seed`."""
    s = rank_seed(seed, rank)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def comm_device(device: torch.device) -> torch.device:
    """Where collective tensors live: the rank's GPU under nccl, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if device.type != "cuda" else device


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """The mean over ranks of each value (every rank passes the same number of values, in the same order)."""
    _, world = dist_info()
    if world == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device(device))
    dist.all_reduce(t)
    return (t / world).tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list outside torchrun)."""
    _, world = dist_info()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op outside torchrun)."""
    if dist_info()[1] > 1:
        dist.barrier()
