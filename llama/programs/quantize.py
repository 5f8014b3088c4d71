"""`llama-quantize`, `python -m llama quantize`: write a checkpoint with int8 or int4 weights
(llama/checkpoints/quantize.py does the work)."""

from __future__ import annotations

from typing import List, Optional

from . import cli
from ..checkpoints.quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, MODES, quantize_checkpoint


def parser() -> cli.ArgumentParser:
    p = cli.rewrite_parser(
        "quantize", "Write a Llama checkpoint with int8 or int4 weights (Meta's layout), which Llama.build loads "
        "without a bfloat16 copy.", "%(prog)s SRC_DIR DST_DIR --mode int8|int4 [--group_size G] [--mp N]",
        "checkpoint to read (Meta's layout or Hugging Face's, any shard count)",
        "new or empty directory to write the quantized checkpoint into")
    p.add_argument("--mode", choices=MODES, required=True,
                   help="int8: one scale per output row; int4: a scale and zero per group of inputs")
    p.add_argument(*cli.flag("group_size"), type=int, default=None, metavar="G",
                   help=f"int4 inputs per group, one of {list(GROUP_SIZES)} (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--mp", type=int, default=None, metavar="N",
                   help="number of shards to write (default: the source's; 1 for Hugging Face's layout)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    opts = parser().parse_args(argv)
    return cli.run_rewrite(lambda log: quantize_checkpoint(opts.src_dir, opts.dst_dir, opts.mode, opts.group_size,
                                                           opts.mp, log=log))


def entry_point() -> None:
    cli.exit_with(main)
