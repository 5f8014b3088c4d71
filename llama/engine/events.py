"""What the engine hands a request's sink: text chunks with their tokens and log-probs, then one Finished."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

from .params import SamplingParams


@dataclass
class TokenLogprob:
    """One generated token as text (`bytes:\\xNN` for a lone byte-fallback token), its log-prob, the top-k."""

    token: str
    bytes: List[int]
    logprob: float
    top: List[Tuple[str, List[int], float]]


@dataclass
class Chunk:
    """New output of one choice: text (whole characters, stop strings cut; may be ""), the new token ids, and
    their log-probs when asked. The first chunk of a request that asked for prompt log-probs carries them."""

    text: str
    logprobs: List[TokenLogprob] = field(default_factory=list)
    tokens: List[int] = field(default_factory=list)
    index: int = 0  # which of the request's n choices
    prompt_logprobs: Optional[List[float]] = None


@dataclass
class Finished:
    """A choice's last event. reason: 'stop' (a stop token or string), 'length' (max_tokens or the context),
    'cancelled', or 'error' (message says why)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    message: str = ""
    index: int = 0


Event = Union[Chunk, Finished]
Sink = Callable[[Event], None]


@dataclass(eq=False)
class Request:
    """A prompt to continue: its tokens, how to sample, and where its events go (called on the engine's
    thread: a sink must return at once). `cancelled` may be set from any thread."""

    prompt: List[int]
    params: SamplingParams
    sink: Sink
    id: str = ""
    cancelled: bool = False


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_text(tokenizer, token: int) -> Tuple[str, List[int]]:
    """A token as OpenAI's log-prob entries show it: its text (word-boundary '▁' as a space; a byte-fallback
    token of a non-ASCII byte as `bytes:\\xNN`) and its UTF-8 bytes."""
    piece = tokenizer.id_to_piece(token)
    match = _BYTE_PIECE.fullmatch(piece)
    if match:
        value = int(match.group(1), 16)
        return (chr(value) if value < 0x80 else f"bytes:\\x{value:02x}"), [value]
    text = piece.replace("\u2581", " ")
    return text, list(text.encode("utf-8"))


def top_entries(tokenizer, values: Sequence[float], ids: Sequence[int]) -> List[Tuple[str, List[int], float]]:
    return [(*token_text(tokenizer, t), v) for t, v in zip(ids, values)]
