"""`python -m llama.web`: the web chat page, with the API beside it (the flags of `python -m llama.serve`).

The page is at http://127.0.0.1:8000/web by default; see llama/serve/web.py. Needs `pip install -e ".[web]"`.
"""

from .serve.__main__ import entry_point as _serve


def entry_point() -> None:
    """`llama-web` and `python -m llama web`."""
    _serve(web=True)


if __name__ == "__main__":
    entry_point()
