"""The engine: rows of the KV cache, prefill and decode steps, the one sampler, stop rules and events.

Everything that generates (Llama's methods, the server) runs through `Engine`; see engine.py.
"""

from .engine import Engine
from .events import Chunk, Event, Finished, Request, TokenLogprob, token_text
from .params import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, MAX_LOGPROBS, SamplingParams
from .runner import Runner, StepPlan, follow

__all__ = ["Engine", "Chunk", "Event", "Finished", "Request", "TokenLogprob", "token_text", "SamplingParams",
           "DEFAULT_TEMPERATURE", "DEFAULT_TOP_P", "MAX_LOGPROBS", "Runner", "StepPlan", "follow"]
