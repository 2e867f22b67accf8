"""Process-group and device helpers, with world-size-1 defaults.

Every function works without `torch.distributed` being initialised (a single process is rank 0 of a
world of 1), so the training loop runs the same code path at any world size. Launching with `torchrun`
and wrapping the model in DistributedDataParallel build on these helpers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from bertforge.errors import BertforgeError


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on the process that prints, logs and writes files."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums `tensor` over all processes in place and returns it (a no-op at world size 1)."""
    if _active() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Waits for every process (a no-op at world size 1)."""
    if _active() and world_size() > 1:
        dist.barrier()


def resolve_device(name: str) -> torch.device:
    """`auto` | `cpu` | `cuda` -> this process's device (under torchrun, cuda:LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise BertforgeError("--device cuda: no CUDA device is available; use --device cpu (or auto)")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name != "cpu":
        raise BertforgeError(f"--device {name!r} is not one of auto, cpu, cuda")
    return torch.device("cpu")


def available_memory(device: torch.device) -> int | None:
    """Free bytes on `device`: CUDA's free memory, or MemAvailable from /proc/meminfo (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
