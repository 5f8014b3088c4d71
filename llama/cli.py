"""What the command-line scripts share: the demo checkpoint default and the one line that says so."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional, Tuple

import fire

from . import distributed

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo" / "fortune-llama"


def resolve_checkpoint(ckpt_dir: Optional[str], tokenizer_path: Optional[str]) -> Tuple[str, str]:
    """The user's paths, or the bundled demo model when neither is given (saying so in one line)."""
    if ckpt_dir is None and tokenizer_path is None:
        distributed.print0(f"No --ckpt_dir/--tokenizer_path given: using the bundled demo model in {DEMO_DIR} "
                           "(a tiny model trained on fortune quotations, not Llama 2).")
        return str(DEMO_DIR), str(DEMO_DIR / "tokenizer.model")
    if ckpt_dir is None or tokenizer_path is None:
        missing = "--ckpt_dir" if ckpt_dir is None else "--tokenizer_path"
        raise ValueError(f"{missing} is missing: give both --ckpt_dir and --tokenizer_path, or neither for the demo")
    return str(ckpt_dir), str(tokenizer_path)


def run(main: Callable) -> None:
    """fire.Fire(main), with the library's input errors shown as one line on rank 0 and exit status 2."""
    try:
        fire.Fire(main)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        distributed.print0(f"error: {err}", file=sys.stderr)
        sys.exit(2)
