"""Serving: an OpenAI-compatible HTTP server over a continuous-batching engine, and a web chat page.

    python -m llama.serve --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model   # pip install -e ".[serve]"
    python -m llama.web ...                                                          # pip install -e ".[web]"

scheduler.py is the engine (requests, rows, sampling; no HTTP), runner.py the model calls of a step on every
rank, protocol.py the OpenAI request checks and response shapes, api.py the ASGI app, security.py its Host and
Origin checks, connections.py uvicorn's connection limits, limits.py every limit's default, stop.py stop
strings, web.py the chat page, __main__.py the command line.
"""

from .scheduler import Chunk, Engine, Finished, QueueFull, Request, SamplingParams, Unavailable

__all__ = ["Engine", "Request", "SamplingParams", "Chunk", "Finished", "QueueFull", "Unavailable"]
