"""Process group, model-parallel group and device: the only module that touches torch.distributed.

Under torchrun (or any launcher that sets RANK/WORLD_SIZE/MASTER_ADDR) the env:// rendezvous is used, on one
node or many. A plain `python script.py` becomes a one-process group over an in-memory store: no port, no
network. NCCL serves CUDA devices, gloo the CPU.
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init


@dataclass
class _Runtime:
    model_parallel_rank: int
    model_parallel_size: int
    device: torch.device


def launched() -> bool:
    """Started by torchrun (or a launcher setting the same variables): join its env:// rendezvous."""
    return "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def pick_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    """The device asked for (None: CUDA where there is a GPU, else the CPU), checked against this machine
    before anything is loaded: no such GPU, or more processes on this node than GPUs, is a clear error."""
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be 'cuda', 'cuda:N' or 'cpu', got {device!r}") from None
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda', 'cuda:N' or 'cpu', got {device!r}")
    if dev.type != "cuda":
        return dev
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"device {device!r} was asked for but no CUDA GPU is available; use --device cpu")
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device {device!r} ({dev}) does not exist: this machine has {count} CUDA GPU(s) "
                         f"(cuda:0..cuda:{count - 1})")
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if launched() else 1
    if dev.index is None and local_procs > count:
        raise ValueError(f"{local_procs} processes were started on this node but it has {count} CUDA GPU(s): "
                         f"use --nproc_per_node {count} (any checkpoint loads on any valid process count) or "
                         "--device cpu")
    if dev.index is None:  # this process's GPU: torchrun's local rank picks it
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % count)
    return dev


def planned_model_parallel_size(model_parallel_size: Optional[int]) -> int:
    """The model-parallel size `setup` will use, known (and checked) before any rendezvous."""
    world = dist.get_world_size() if dist.is_initialized() else (int(os.environ["WORLD_SIZE"]) if launched() else 1)
    mp = world if model_parallel_size is None else model_parallel_size
    if not isinstance(mp, int) or isinstance(mp, bool) or mp < 1 or world % mp:
        raise ValueError(f"model_parallel_size {model_parallel_size!r} must be a positive divisor of the "
                         f"{world} launched processes")
    return mp


def setup(model_parallel_size: int, device: torch.device) -> _Runtime:
    """Join (or create) the process group and the model-parallel group; place this rank on its device."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if launched():
            dist.init_process_group(backend)
        else:
            hook = sys.excepthook  # torch prefixes every traceback line with "[rank0]:"; alone, that is noise
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            sys.excepthook = hook
        atexit.register(_teardown)
    if not fs_init.model_parallel_is_initialized():
        _quietly(fs_init.initialize_model_parallel, model_parallel_size)
    elif fs_init.get_model_parallel_world_size() != model_parallel_size:
        raise ValueError(f"model parallelism is already initialised with size "
                         f"{fs_init.get_model_parallel_world_size()}, not {model_parallel_size}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return _Runtime(fs_init.get_model_parallel_rank(), model_parallel_size, device)


def _quietly(fn, *args):
    """fairscale prints three lines per rank when it sets up its groups; keep the console for the user."""
    stdout, sys.stdout = sys.stdout, open(os.devnull, "w")
    try:
        return fn(*args)
    finally:
        sys.stdout.close()
        sys.stdout = stdout


def _teardown() -> None:
    """Leave the process group cleanly, so no rank aborts or warns at exit."""
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _is_rank0() -> bool:
    """Global rank 0, also before the process group exists (torchrun's RANK says which this will be)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def model_parallel_max(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum over the model-parallel group, in place (the tensor as it is at one process)."""
    if fs_init.model_parallel_is_initialized() and fs_init.get_model_parallel_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=fs_init.get_model_parallel_group())
    return tensor


def print0(*args, **kwargs) -> None:
    """Print on global rank 0 only."""
    if _is_rank0():
        print(*args, **kwargs, flush=True)


class Broadcast:
    """Rank 0's decisions (an input line, a stop flag, a scheduler step) handed to every rank.

    Values travel over a gloo group of their own with a long timeout: the other ranks may wait in a broadcast
    while a user thinks or a server idles, and the default group's timeout (30 minutes) would end the run.
    """

    def __init__(self) -> None:
        self.world = _world_size()
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.group = dist.new_group(backend="gloo", timeout=timedelta(days=7)) if self.world > 1 else None

    def share(self, value: Any) -> Any:
        """rank 0's value, on every rank (the others pass anything)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]
