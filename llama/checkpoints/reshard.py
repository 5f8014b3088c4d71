"""Rewrite a checkpoint in Meta's layout with another number of shards.

    python -m llama reshard SRC_DIR DST_DIR --mp N

Reads a checkpoint of any number of shards and writes one of N shards (bfloat16 unless --dtype says
otherwise; params.json copied byte for byte; rope.freqs and the other replicated entries kept in every shard).
Target shards are built one at a time from memory-mapped source shards (``checkpoint.load_rank_state``), so
memory holds one target shard plus one source shard's mapping, never the whole model unless N is 1. Every file
is written under a temporary name and renamed when complete, params.json last; DST_DIR must not already hold
a checkpoint. Loading does not need this: ``Llama.build`` takes any checkpoint into any valid process count.
Resharding saves the slicing work at every start, and gives files that match the process count one to one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from .checkpoint import PathLike, ensure_empty_destination, load_rank_state
from .rewrite import check_distinct, check_shard_count, write_shards
from .source import Checkpoint


def reshard(
    src_dir: PathLike,
    dst_dir: PathLike,
    n_shards: int,
    dtype: torch.dtype = torch.bfloat16,
    log: Optional[Callable[[str], None]] = None,
) -> Path:
    """Write the checkpoint in `src_dir` into the new or empty `dst_dir` as `n_shards` shards of `dtype`.

    Raises FileNotFoundError / ValueError / FileExistsError, before writing anything, for a missing or
    unreadable source, an `n_shards` the model's heads cannot be split into (the message lists the valid
    values) or a destination that already holds a checkpoint.
    """
    log = log or (lambda message: None)
    ckpt = Checkpoint.open(src_dir)
    if ckpt.layout != "meta":
        raise ValueError(f"{str(src_dir)!r} is in Hugging Face's layout: convert it (python -m llama convert) "
                         "instead of resharding it")
    check_shard_count(n_shards, ckpt.valid_worlds, ckpt.check_world)
    check_distinct(src_dir, dst_dir)
    ensure_empty_destination(dst_dir)  # also checked by write_checkpoint; here so nothing is read before it fails
    params_bytes = (Path(src_dir) / "params.json").read_bytes()
    log(f"resharding {ckpt.n_shards} shard(s) of {src_dir} into {n_shards} shard(s) in {dst_dir} "
        f"({str(dtype).removeprefix('torch.')})")
    write_shards(dst_dir, params_bytes, n_shards,
                 lambda index: load_rank_state(ckpt.shards, index, n_shards, dtype=dtype, scheme=ckpt.scheme), log)
    log(f"done: {dst_dir} (params.json copied)")
    return Path(dst_dir)
