"""Serving: an OpenAI-compatible HTTP server over a continuous-batching engine, and a web chat page.

    python -m llama.serve --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model   # pip install -e ".[serve]"
    python -m llama.web ...                                                          # pip install -e ".[web]"

scheduler.py keeps the requests (queue, admission, cancellation, the engine thread) over llama/engine's row
engine (rows, steps, sampling, stops; no HTTP), protocol.py the OpenAI request checks and response shapes, api.py
the ASGI app, security.py its Host and Origin checks, connections.py uvicorn's connection limits, limits.py every
limit's default, web.py the chat page, __main__.py the command line.
"""

from ..engine import Chunk, Finished, Request, SamplingParams
from .scheduler import Engine, QueueFull, Scheduler, Unavailable

__all__ = ["Scheduler", "Engine", "Request", "SamplingParams", "Chunk", "Finished", "QueueFull", "Unavailable"]
