"""`llama-web`, `python -m llama web`: the server of `llama-serve` with its web chat page at /web (the same
flags; needs the web extra). The page is llama/serve/web.py.
"""

from __future__ import annotations

from typing import List, Optional

from . import serve


def main(argv: Optional[List[str]] = None) -> int:
    return serve.main(argv, web=True)


def entry_point() -> None:
    serve.entry_point(web=True)
