"""What a caller may ask of one request's sampling, checked in one place, and the library's defaults.

The names and ranges follow OpenAI's API (and vLLM's extensions for top_k, min_p, repetition_penalty,
stop_token_ids); the defaults are the released Llama 2 reference's (temperature 0.6, top-p 0.9). Every front
door (Llama's methods, the command lines, the server) takes its defaults from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

from .grammar import Grammar

DEFAULT_TEMPERATURE = 0.6  # the released reference's defaults for Llama 2 (its generation_config.json too)
DEFAULT_TOP_P = 0.9
MAX_LOGPROBS = 20  # most alternatives a request may ask for at each position (OpenAI's limit)
MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy: logits / T would overflow, and the limit is argmax
SEED_BITS = 64  # seeds are unsigned 64-bit integers, the range torch.Generator takes; others are refused


class ParamError(ValueError):
    """A sampling parameter out of range; `param` names the field (the server's 400 names it too)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _number(name: str, value, low: float, high: float, low_open: bool = False, param: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            not (low < value if low_open else low <= value) or not value <= high:
        if math.isinf(high):
            span = f"a number {'>' if low_open else '>='} {low:g}"
        else:
            span = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise ParamError(f"{name} must be {span}, got {value!r}", param or name)
    return float(value)


def _integer(name: str, value, low: int, high: Optional[int] = None, param: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise ParamError(f"{name} must be an integer {span}, got {value!r}", param or name)
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How one request is continued. `check` validates it (ValueError naming the field) before any work."""

    max_tokens: int = 256
    temperature: float = DEFAULT_TEMPERATURE  # 0 (or below MIN_TEMPERATURE): greedy
    top_p: float = DEFAULT_TOP_P  # nucleus: the smallest set of likeliest tokens reaching this probability
    top_k: int = 0  # 0: off; else only the k likeliest tokens
    min_p: float = 0.0  # drop tokens below min_p x the likeliest token's probability
    presence_penalty: float = 0.0  # OpenAI's: minus this for each token already generated
    frequency_penalty: float = 0.0  # OpenAI's: minus this times how often it was generated
    repetition_penalty: float = 1.0  # transformers': logits of prompt and generated tokens divided (or, if negative, multiplied)
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to its logit, -100..100
    seed: Optional[int] = None  # 0..2**64-1; None: drawn from the engine's seed sequence
    stop: Tuple[str, ...] = ()  # stop strings, cut from the text
    stop_token_ids: Tuple[int, ...] = ()  # stop tokens besides the model's own end-of-turn tokens
    ignore_stop_ids: Tuple[int, ...] = ()  # model stop tokens this request goes past (Code Llama's infilling: EOS)
    logprobs: Optional[int] = None  # None: no log-probs; k: each token's and the k likeliest alternatives
    prompt_logprobs: bool = False  # also the log-prob of each prompt token (echo)
    n: int = 1  # choices sharing one prefill
    grammar: Optional[Grammar] = None  # structured output: what each choice's tokens must spell (grammar.py)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def check(self, vocab_size: Optional[int] = None) -> "SamplingParams":
        """Raise ValueError naming the first field out of range; returns self for chaining. Token ids are checked
        against vocab_size when it is known."""
        top_id = None if vocab_size is None else vocab_size - 1
        _integer("max_tokens", self.max_tokens, 0)
        _number("temperature", self.temperature, 0.0, math.inf)
        _number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _integer("top_k", self.top_k, 0)
        _number("min_p", self.min_p, 0.0, 1.0)
        _number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _number("repetition_penalty", self.repetition_penalty, 0.0, math.inf, low_open=True)
        if not isinstance(self.logit_bias, Mapping):
            raise ParamError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}", "logit_bias")
        for token, bias in self.logit_bias.items():
            _integer("a logit_bias token id", token, 0, top_id, param="logit_bias")
            _number(f"logit_bias[{token}]", bias, -100.0, 100.0, param="logit_bias")
        if self.seed is not None:
            _integer("seed", self.seed, 0, 2 ** SEED_BITS - 1)
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) for s in self.stop):
            raise ParamError(f"stop must be a list of strings, got {self.stop!r}", "stop")
        for token in self.stop_token_ids:
            _integer("a stop_token_ids entry", token, 0, top_id, param="stop_token_ids")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if not isinstance(self.prompt_logprobs, bool):
            raise ParamError(f"prompt_logprobs must be True or False, got {self.prompt_logprobs!r}", "prompt_logprobs")
        _integer("n", self.n, 1)
        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            raise ValueError(f"grammar must be a Grammar (Grammar.compile), got {type(self.grammar).__name__}")
        return self

    def seed_for(self, choice: int) -> Optional[int]:
        """The 64-bit seed of choice `choice` (choices of one seeded request differ, reproducibly)."""
        return None if self.seed is None else (self.seed + choice) % 2 ** SEED_BITS
