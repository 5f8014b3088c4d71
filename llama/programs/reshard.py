"""`llama-reshard`, `python -m llama reshard`: a Meta checkpoint rewritten with another shard count
(llama/checkpoints/reshard.py does the work)."""

from __future__ import annotations

from typing import List, Optional

from . import cli
from ..checkpoints.loading import parse_dtype
from ..checkpoints.reshard import reshard


def parser() -> cli.ArgumentParser:
    p = cli.rewrite_parser(
        "reshard", "Rewrite a Llama checkpoint (consolidated.NN.pth + params.json) with N shards, one per "
        "model-parallel process.", "%(prog)s SRC_DIR DST_DIR --mp N [--dtype D]",
        "checkpoint to read (any number of shards)", "new or empty directory to write the resharded checkpoint into")
    p.add_argument("--mp", type=int, required=True, metavar="N",
                   help="number of shards to write: the model-parallel process count it will run on")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype of the written weights (bfloat16, as Meta's files)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    opts = parser().parse_args(argv)
    return cli.run_rewrite(lambda log: reshard(opts.src_dir, opts.dst_dir, opts.mp, parse_dtype(opts.dtype), log=log))


def entry_point() -> None:
    cli.exit_with(main)
