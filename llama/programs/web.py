"""`llama-web`, `python -m llama web`: the server of `llama-serve` with its web chat page at /web (the same
flags; needs the web extra). The page is llama/serve/web.py.
"""

from __future__ import annotations

from typing import List, Optional

from . import cli


def main(argv: Optional[List[str]] = None) -> int:
    from ..serve.__main__ import main as serve

    return serve(argv, web=True)


def entry_point() -> None:
    from ..serve.__main__ import entry_point as serve

    cli.exit_with(lambda: serve(web=True))
