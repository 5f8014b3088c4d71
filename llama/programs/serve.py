"""`llama-serve`, `python -m llama serve`: the OpenAI-compatible HTTP server (needs the serve extra).

Its flags and start-up live beside the server, in llama/serve/__main__.py (which `python -m llama.serve` and
`torchrun -m llama.serve` run); this is its name among the programs.
"""

from __future__ import annotations

from typing import List, Optional

from . import cli


def main(argv: Optional[List[str]] = None) -> int:
    from ..serve.__main__ import main as serve

    return serve(argv)


def entry_point() -> None:
    from ..serve.__main__ import entry_point as serve

    cli.exit_with(lambda: serve())
