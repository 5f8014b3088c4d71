"""Serving: an OpenAI-compatible HTTP server over a continuous-batching engine, and a web chat page.

    python -m llama.serve --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model   # pip install -e ".[serve]"
    python -m llama.web ...                                                          # pip install -e ".[web]"

scheduler.py keeps the requests (queue, admission, cancellation, the engine thread) over llama/engine's row
engine (rows, steps, sampling, stops; no HTTP); requests.py checks OpenAI request bodies into jobs (a kind object
per endpoint) and responses.py shapes their answers; api.py builds the ASGI app from routers (completion_routes,
model_routes, health_routes, tokenize, web) over one ServerState (state.py); security.py does its Host and Origin
checks, connections.py uvicorn's connection limits, limits.py every limit's default. The command line is
llama/programs/serve.py (__main__.py only calls it).
"""

from ..engine import Chunk, Finished, Request, SamplingParams
from .scheduler import Engine, QueueFull, Scheduler, Unavailable

__all__ = ["Scheduler", "Engine", "Request", "SamplingParams", "Chunk", "Finished", "QueueFull", "Unavailable"]
