"""Process group, model-parallel group and device: the only module that touches torch.distributed setup.

Under torchrun (or any launcher that sets RANK/WORLD_SIZE/MASTER_ADDR) the env:// rendezvous is used, on one
node or many. A plain `python script.py` becomes a one-process group over an in-memory store: no port, no
network. NCCL serves CUDA devices, gloo the CPU.
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init


@dataclass
class Runtime:
    rank: int  # global rank
    world_size: int
    model_parallel_rank: int
    model_parallel_size: int
    device: torch.device


def pick_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cuda', 'cpu' or None, got {device!r}") from None
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda', 'cpu' or None, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use device='cpu'")
    return dev


def _launched() -> bool:
    """Started by torchrun (or a launcher setting the same variables): join its env:// rendezvous."""
    return "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def planned_model_parallel_size(model_parallel_size: Optional[int]) -> int:
    """The model-parallel size `setup` will use, known (and checked) before any rendezvous."""
    world = dist.get_world_size() if dist.is_initialized() else (
        int(os.environ["WORLD_SIZE"]) if _launched() else 1)
    mp = world if model_parallel_size is None else model_parallel_size
    if not isinstance(mp, int) or isinstance(mp, bool) or mp < 1 or world % mp:
        raise ValueError(f"model_parallel_size {model_parallel_size!r} must be a positive divisor of the "
                         f"{world} launched processes")
    return mp


def setup(model_parallel_size: Optional[int], device: Optional[Union[str, torch.device]]) -> Runtime:
    """Join (or create) the process group and the model-parallel group; choose this rank's device."""
    dev = pick_device(device)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if _launched():
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        atexit.register(teardown)
    mp = planned_model_parallel_size(model_parallel_size)
    if not fs_init.model_parallel_is_initialized():
        _quietly(fs_init.initialize_model_parallel, mp)
    elif fs_init.get_model_parallel_world_size() != mp:
        raise ValueError(f"model parallelism is already initialised with size "
                         f"{fs_init.get_model_parallel_world_size()}, not {mp}")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return Runtime(dist.get_rank(), dist.get_world_size(), fs_init.get_model_parallel_rank(), mp, dev)


def _quietly(fn, *args):
    """fairscale prints three lines per rank when it sets up its groups; keep the console for the user."""
    stdout, sys.stdout = sys.stdout, open(os.devnull, "w")
    try:
        return fn(*args)
    finally:
        sys.stdout.close()
        sys.stdout = stdout


def teardown() -> None:
    """Leave the process group cleanly, so no rank aborts or warns at exit."""
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    """Print on global rank 0 only."""
    if is_rank0():
        print(*args, **kwargs, flush=True)
