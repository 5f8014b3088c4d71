"""The one pipeline under reshard, quantize and convert (to Meta's layout): checks, then N shards built one at a
time, each logged, written under temporary names and renamed when complete, params.json last."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Union

import torch

from .checkpoint import PathLike, write_checkpoint
from ..model.transformer import check_positive_int

Log = Callable[[str], None]


def check_shard_count(n_shards: object, valid: Callable[[], List[int]], check: Callable[[int], None]) -> None:
    """ValueError unless `n_shards` (--mp) is a positive integer the model's heads split into: `valid()` lists
    the values that are, for the message; `check(n)` raises for one that is not."""
    try:
        check_positive_int("--mp", n_shards)
    except ValueError as err:
        raise ValueError(f"{err}; valid values for this checkpoint: {valid()}") from None
    check(n_shards)  # type: ignore[arg-type]


def check_distinct(src_dir: PathLike, dst_dir: PathLike) -> None:
    """FileExistsError when the destination is the source folder."""
    if Path(src_dir).resolve() == Path(dst_dir).resolve():
        raise FileExistsError(f"source and destination are the same directory {str(Path(src_dir).resolve())!r}; "
                              "choose a new one")


def write_shards(dst_dir: PathLike, params: Union[bytes, Mapping[str, Any]], n_shards: int,
                 make_shard: Callable[[int], Dict[str, torch.Tensor]], log: Optional[Log] = None) -> Path:
    """Write shards 0..n_shards-1, each `make_shard(index)` (built only when its turn comes, so memory holds one
    at a time), and then params.json, into `dst_dir`; each shard is logged with its size and time."""
    log = log or (lambda message: None)

    def shards() -> Iterator[Dict[str, torch.Tensor]]:
        for index in range(n_shards):
            start = time.perf_counter()
            state = make_shard(index)
            size = sum(t.numel() * t.element_size() for t in state.values())
            yield state
            del state
            log(f"  [{index + 1}/{n_shards}] consolidated.{index:02d}.pth: {size / 2**20:.1f} MiB "
                f"in {time.perf_counter() - start:.2f} s")

    write_checkpoint(dst_dir, params, shards())
    return Path(dst_dir)
