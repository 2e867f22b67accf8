"""Process-group and device helpers, with world-size-1 defaults.

Every function works without `torch.distributed` being initialised (a single process is rank 0 of a
world of 1), so the training loop runs the same code path at any world size. Under `torchrun`
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/MASTER_PORT in the environment) `process_group` joins the
job's group (NCCL on CUDA, Gloo on CPU) with a timeout on every collective, so a rank that dies or
hangs ends the job with an error instead of a silent wait; `wrap_ddp` applies DistributedDataParallel
from outside the model.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bertforge.errors import BertforgeError

T = TypeVar("T")
DEFAULT_TIMEOUT_SECONDS = 600.0  # how long a collective waits for the other ranks (`pretrain --dist-timeout`)


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


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's `obj` (picklable), in rank order, on rank 0; None on the others; [obj] at world size 1."""
    if not (_active() and world_size() > 1):
        return [obj]
    gathered: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def seed_rank_stream(seed: int) -> None:
    """Gives each rank its own torch random stream (dropout masks) derived from `seed`; a no-op at world size 1.

    Call it after the weights are initialised: those come from `seed` alone and are the same on every rank.
    """
    if world_size() > 1:
        torch.manual_seed(seed * 1_000_003 + rank())


def launched_as_main() -> bool:
    """True unless a launcher started this process as a rank other than 0 (valid outside the process group too)."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Waits for every process (a no-op at world size 1)."""
    if _active() and world_size() > 1:
        dist.barrier()


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher using its environment variables) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextlib.contextmanager
def process_group(device: torch.device, timeout_seconds: float) -> Iterator[None]:
    """Joins the torchrun process group for the duration of the block and leaves it afterwards.

    A no-op without torchrun's environment or when a group already exists (the caller owns it then).
    Backend: NCCL for CUDA devices (each process on cuda:LOCAL_RANK), Gloo on the CPU. Every
    collective fails after `timeout_seconds` instead of waiting forever for a dead or stuck rank.
    """
    if not launched_by_torchrun() or _active():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds))
    except (RuntimeError, ValueError) as exc:  # an unreachable MASTER_ADDR, a port in use, a rendezvous timeout
        raise BertforgeError(f"cannot join the torchrun process group ({str(exc).splitlines()[0]}); check "
                             "--rdzv-endpoint / MASTER_ADDR:MASTER_PORT and that every node started") from None
    try:
        yield
        # Leave together: rank 0 often works on alone (export, plots) after the others return, and a Gloo group
        # torn down on one rank while a peer still holds its connections can abort that process at exit.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main_first(fn: Callable[[], T]) -> T:
    """Runs `fn` on rank 0 only while the other ranks wait, and returns its result on every rank.

    The result must be picklable. If `fn` fails on rank 0, every rank raises a BertforgeError with its
    message, so the whole job stops with one clear line instead of leaving the others waiting.
    """
    box: list[Any] = [None, None]  # [error message, result]
    failure: BaseException | None = None
    if is_main():
        try:
            box[1] = fn()
        except BertforgeError as exc:
            box[0], failure = str(exc), exc
        except Exception as exc:
            box[0], failure = f"rank 0 failed: {type(exc).__name__}: {exc}", exc
    if world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[0] is not None:
        raise BertforgeError(box[0])
    return box[1]


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` wrapped in DistributedDataParallel when there are several processes, else unchanged.

    DDP broadcasts rank 0's weights at construction and averages gradients in the backward pass
    (bucketed all-reduce overlapped with computation); `no_sync()` skips that on accumulation micro-steps.
    """
    if world_size() == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


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


def shard_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """ZeRO stage 1: the same optimizer class, groups and settings, each process keeping 1/N of its state.

    ZeroRedundancyOptimizer steps only this rank's share of the parameters and broadcasts the updated
    weights, so updates equal the unsharded optimizer's. Call `consolidate_state_dict(to=0)` on every rank
    before rank 0 saves `state_dict()` (the loop does). Unchanged at world size 1.
    """
    if world_size() == 1:
        return optimizer
    # Imported here: torch.distributed.optim pulls in TorchScript (slow to import, deprecation warnings).
    from torch.distributed.optim import ZeroRedundancyOptimizer

    optimizer_class = type(optimizer)
    accepted = inspect.signature(optimizer_class.__init__).parameters
    settings = {k: v for k, v in optimizer.defaults.items() if k in accepted and k != "params"}
    groups = [{k: v for k, v in group.items() if k == "params" or k in accepted} for group in optimizer.param_groups]
    return ZeroRedundancyOptimizer(groups, optimizer_class=optimizer_class, **settings)
