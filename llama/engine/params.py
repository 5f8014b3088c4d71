"""What a caller may ask of one request's sampling, checked in one place, and the library's defaults.

The names and ranges follow OpenAI's API (and vLLM's extensions for top_k, min_p, repetition_penalty,
stop_token_ids); the defaults are the released Llama 2 reference's (temperature 0.6, top-p 0.9). Every front
door (Llama's methods, the command lines, the server, the chat page) takes its defaults and ranges (RANGES)
from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple, Union

from .grammar import Grammar

DEFAULT_TEMPERATURE = 0.6  # the released reference's defaults for Llama 2 (its generation_config.json too)
DEFAULT_TOP_P = 0.9
MAX_LOGPROBS = 20  # most alternatives a request may ask for at each position (OpenAI's limit)
MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy: logits / T would overflow, and the limit is argmax
SEED_BITS = 64  # seeds are unsigned 64-bit integers, the range torch.Generator takes; others are refused
MAX_SEED = 2 ** SEED_BITS - 1
MAX_TEMPERATURE = 2.0  # OpenAI's range is 0..2; above it, sampling is close to uniform noise


class ParamError(ValueError):
    """A sampling parameter out of range; `param` names the field (the server's 400 names it too)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Range:
    """The values a parameter takes: low..high (low itself excluded where `low_open`), whole numbers only where
    `integer`."""

    low: float
    high: float = math.inf
    low_open: bool = False
    integer: bool = False

    def span(self) -> str:
        """The range in words, as the errors say it: "in [0, 2]", "a number >= 0", "an integer 0..20"."""
        if self.integer:
            return f"an integer {int(self.low)}..{int(self.high)}" if math.isfinite(self.high) else \
                f"an integer >= {int(self.low)}"
        if math.isinf(self.high):
            return f"a number {'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    def check(self, name: str, value, param: str = "") -> Union[int, float]:
        """`value` if it is in range, else ParamError naming `name` (and the request field `param`)."""
        ok = not isinstance(value, bool) and (isinstance(value, int) or (
            not self.integer and isinstance(value, float) and math.isfinite(value)))
        if not ok or not (self.low < value if self.low_open else self.low <= value) or not value <= self.high:
            raise ParamError(f"{name} must be {self.span()}, got {value!r}", param or name)
        return value if self.integer else float(value)


# Every sampling parameter's range, by its name in SamplingParams (and in OpenAI's API, and as a flag).
RANGES: Dict[str, Range] = {
    "max_tokens": Range(0, integer=True),
    "temperature": Range(0.0, MAX_TEMPERATURE),
    "top_p": Range(0.0, 1.0, low_open=True),
    "top_k": Range(0, integer=True),
    "min_p": Range(0.0, 1.0),
    "presence_penalty": Range(-2.0, 2.0),
    "frequency_penalty": Range(-2.0, 2.0),
    "repetition_penalty": Range(0.0, low_open=True),
    "logit_bias": Range(-100.0, 100.0),
    "seed": Range(0, MAX_SEED, integer=True),
    "logprobs": Range(0, MAX_LOGPROBS, integer=True),
    "n": Range(1, integer=True),
}


def check_range(name: str, value, param: str = "") -> Union[int, float]:
    """`value` if it is in RANGES[name], else ParamError ("temperature must be in [0, 2], got 5")."""
    return RANGES[name].check(param or name, value, param or name)


def check_prompt(prompt: object, vocab_size: int, max_seq_len: Optional[int] = None,
                 name: str = "the prompt") -> None:
    """ValueError unless `prompt` is a non-empty list of token ids in 0..vocab_size-1, of at most `max_seq_len`
    tokens when given: the one prompt check of Llama's methods and the engine (the server's prompts come from
    its tokenizer; whether an answer fits besides is the caller's own check, with its own words)."""
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError(f"{name} must be a non-empty list of token ids, got {repr(prompt)[:100]}")
    if max_seq_len is not None and len(prompt) > max_seq_len:
        raise ValueError(f"{name} has {len(prompt)} tokens, more than max_seq_len {max_seq_len}")
    bad = [t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{name} has token ids outside 0..{vocab_size - 1}: {bad[:5]}")


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
        for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):
            check_range(name, getattr(self, name))
        if not isinstance(self.logit_bias, Mapping):
            raise ParamError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}", "logit_bias")
        for token, bias in self.logit_bias.items():
            Range(0, math.inf if top_id is None else top_id, integer=True).check("a logit_bias token id", token,
                                                                                 "logit_bias")
            RANGES["logit_bias"].check(f"logit_bias[{token}]", bias, "logit_bias")
        if self.seed is not None:
            check_range("seed", self.seed)
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) for s in self.stop):
            raise ParamError(f"stop must be a list of strings, got {self.stop!r}", "stop")
        for token in self.stop_token_ids:
            Range(0, math.inf if top_id is None else top_id, integer=True).check("a stop_token_ids entry", token,
                                                                                 "stop_token_ids")
        if self.logprobs is not None:
            check_range("logprobs", self.logprobs)
        if not isinstance(self.prompt_logprobs, bool):
            raise ParamError(f"prompt_logprobs must be True or False, got {self.prompt_logprobs!r}", "prompt_logprobs")
        check_range("n", self.n)
        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            raise ValueError(f"grammar must be a Grammar (Grammar.compile), got {type(self.grammar).__name__}")
        return self

    def seed_for(self, choice: int) -> Optional[int]:
        """The 64-bit seed of choice `choice` (choices of one seeded request differ, reproducibly)."""
        return None if self.seed is None else (self.seed + choice) % 2 ** SEED_BITS
