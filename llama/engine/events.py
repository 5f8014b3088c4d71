"""What the engine hands a request's sink: text chunks with their tokens and log-probs, then one Finished."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

from .params import SamplingParams


@dataclass
class TokenLogprob:
    """One generated token as text (`bytes:\\xNN` for a lone byte-fallback token), its log-prob, the top-k."""

    token: str
    bytes: List[int]
    logprob: Optional[float]  # None: an echoed prompt's first token (nothing before it)
    top: List[Tuple[str, List[int], float]]
    offset: int = 0  # where its text starts in the answer's text (characters)


@dataclass
class Chunk:
    """New output of one choice: text (whole characters, stop strings cut; may be ""), the new token ids, and
    their log-probs when asked. The first chunk of a request that asked for prompt log-probs carries them."""

    text: str
    logprobs: List[TokenLogprob] = field(default_factory=list)
    tokens: List[int] = field(default_factory=list)
    index: int = 0  # which of the request's n choices
    prompt_logprobs: Optional[List[float]] = None
    # with prompt log-probs and logprobs=k: each prompt position's k likeliest tokens (the first position's: [])
    prompt_top: Optional[List[List[Tuple[str, List[int], float]]]] = None


@dataclass
class Finished:
    """A choice's last event. reason: 'stop' (a stop token or string), 'length' (max_tokens or the context),
    'cancelled', 'abort' (ended by its server: a drain ran out of time; message says so) or 'error' (message
    says why)."""

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
    # True: the answer's text continues the prompt's (prompt text + answer = decode(prompt + answer tokens), its
    # first word-boundary space kept), as completions want. False: the answer's tokens decoded alone (the first
    # space dropped), as Llama.chat_completion and the chat endpoint give.
    continues_prompt: bool = False
    aborted: Optional[str] = None  # set by a server's abort: the request ends with Finished('abort', message)
    lora: Optional[str] = None  # the LoRA adapter it runs under (a name the model's LoraSlots serves); None: base


def token_text(tokenizer, token: int) -> Tuple[str, List[int]]:
    """A token as OpenAI's log-prob entries show it: its text (SentencePiece's word-boundary '▁' as a space) and
    its UTF-8 bytes; a token that is not whole UTF-8 (a byte-fallback or byte-level piece) as `bytes:\\xNN...`.
    tokenizer.token_bytes serves SentencePiece and tiktoken alike."""
    raw = tokenizer.token_bytes(token)
    try:
        return raw.decode("utf-8"), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


def top_entries(tokenizer, values: Sequence[float], ids: Sequence[int]) -> List[Tuple[str, List[int], float]]:
    return [(*token_text(tokenizer, t), v) for t, v in zip(ids, values)]
