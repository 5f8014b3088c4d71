"""`llama-convert`, `python -m llama convert`: a checkpoint from Meta's layout to Hugging Face's, or back
(llama/checkpoints/convert.py does the work)."""

from __future__ import annotations

from typing import List, Optional

from . import cli
from .. import families
from ..checkpoints.convert import _parse_size, convert
from ..checkpoints.loading import parse_dtype


def parser() -> cli.ArgumentParser:
    p = cli.rewrite_parser(
        "convert", "Convert a Llama checkpoint between Meta's layout (consolidated.NN.pth + params.json) and Hugging "
        "Face's (safetensors + config.json), in the direction SRC_DIR's layout implies.",
        "%(prog)s SRC_DIR DST_DIR [--to hf|meta] [--mp N] [--dtype D] [--tokenizer_path PATH] [--family F] "
        "[--max_shard_size SIZE]",
        "checkpoint to read, in either layout", "new or empty directory to write the converted checkpoint into")
    p.add_argument("--to", choices=("hf", "meta"), default=None,
                   help="layout to write (default: the one SRC_DIR is not in)")
    p.add_argument("--mp", type=int, default=None, metavar="N",
                   help="--to meta: number of shards to write, the model-parallel process count (default 1)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="dtype of the written weights (default: as stored in SRC_DIR)")
    p.add_argument(*cli.flag("tokenizer_path"), default=None,
                   help="--to hf: tokenizer.model to include (default: SRC_DIR's, else the folder above's)")
    p.add_argument("--family", default=None, choices=families.NAMES,
                   help="--to hf: the model's family (default: detected from the files)")
    p.add_argument(*cli.flag("max_shard_size"), default="5GB",
                   help="--to hf: largest safetensors file (as transformers writes)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    opts = parser().parse_args(argv)
    return cli.run_rewrite(
        lambda log: convert(opts.src_dir, opts.dst_dir, opts.to, opts.mp, parse_dtype(opts.dtype) if opts.dtype else
                            None, opts.tokenizer_path, _parse_size(opts.max_shard_size), log=log, family=opts.family),
        what="file")


def entry_point() -> None:
    cli.exit_with(main)
