"""Responses: the JSON of a whole answer and the server-sent events of a streamed one.

What differs between completions and chat (object names, a choice's `text` or `message`, the log-probs' format,
tool calls) the job's kind says (requests.py); this module puts the choices together, sums the usage, and
writes the events, `data: {json}` each and `data: [DONE]` last.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

from ..engine import Finished, TokenLogprob, token_text
from ..engine.grammar import GrammarError
from ..tokenizer import TextStream
from .errors import APIError, bad
from .requests import Job

DONE = "data: [DONE]\n\n"


def usage(finished: Sequence[Finished]) -> Dict[str, int]:
    """Token counts of a request: its prompt once, the answers of all its choices."""
    prompt, completion = finished[0].prompt_tokens, sum(f.completion_tokens for f in finished)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def prompt_entries(tokenizer: Any, job: Job, values: Sequence[float], top: Optional[Sequence[Any]]) \
        -> List[TokenLogprob]:
    """The echoed prompt's log-prob entries (OpenAI's legacy echo): its first token has none (null), each other
    token its log-prob given the tokens before it and its position's top alternatives; text_offset points into
    the echoed text."""
    stream = TextStream(tokenizer)
    entries = []
    for i, token in enumerate(job.prompt):
        text, raw = token_text(tokenizer, token)
        offset = min(stream.offset, len(job.echo))
        stream.push(token)
        entries.append(TokenLogprob(text, raw, None if i == 0 else values[i], [] if top is None else top[i],
                                    offset))
    return entries


def finish_reason(finished: Finished) -> str:
    """OpenAI's finish_reason: 'length' also for an answer the server cut short (a drain that timed out)."""
    return "length" if finished.reason in ("length", "abort") else "stop"


def grammar_failure(job: Job, finished: Finished) -> Optional[APIError]:
    """The 400 for an answer whose grammar's matcher failed mid-answer (a limit reached), else None: the
    client's grammar, not the server, is at fault, and only this request ended."""
    grammar = job.params.grammar
    if grammar is None or not finished.message.startswith(GrammarError.__name__ + ":"):
        return None
    message = finished.message[len(GrammarError.__name__) + 1:].strip()
    return bad(f"'{grammar.origin}': {message}", param=grammar.origin or None, code="grammar_failed")


def response(job: Job, texts: List[str], entries: List[List[TokenLogprob]], finished: List[Finished],
             prompt: Sequence[TokenLogprob] = ()) -> Dict[str, Any]:
    """The non-streamed answer: one choice per index (n choices share the prompt; with a list of prompts, the
    choices of prompt k are k*n..k*n+n-1). prompt: the echoed prompt's log-prob entries, when asked."""
    want_lps = job.params.logprobs is not None
    choices = [job.kind.choice(job, job.index * job.params.n + i, text, lps if want_lps else None, prompt,
                               finish_reason(end))
               for i, (text, lps, end) in enumerate(zip(texts, entries, finished))]
    return {"id": job.kind.id_prefix + job.id, "object": job.kind.object, "created": job.created,
            "model": job.model, "choices": choices, "usage": usage(finished)}


def merged(answers: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The answers to a completion's prompts as one: their choices in prompt order, their usage summed."""
    first = dict(answers[0])
    first["choices"] = [c for a in answers for c in a["choices"]]
    first["usage"] = {k: sum(a["usage"][k] for a in answers) for k in answers[0]["usage"]}
    return first


class ChunkWriter:
    """The streamed answer, as server-sent events: one `data: {json}` per chunk, then `data: [DONE]`."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.calls = job.kind.streamed_calls(job)

    def _event(self, choices: List[Dict[str, Any]], **extra: Any) -> str:
        kind = self.job.kind
        payload = {"id": kind.id_prefix + self.job.id, "object": kind.chunk_object, "created": self.job.created,
                   "model": self.job.model, "choices": choices, **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def start(self) -> List[str]:
        """What opens the stream: the assistant role (chat), the echoed prompt (completions with echo), for each
        choice."""
        openings = [self.job.kind.opening(self.job, i) for i in range(self.job.params.n)]
        return [self._event([choice]) for choice in openings if choice is not None]

    def echo(self, prompt: List[TokenLogprob]) -> List[str]:
        """The echoed prompt with its log-probs, for each choice (the engine's first chunk carries them)."""
        return [self._event([{"index": i, "text": self.job.echo, "finish_reason": None,
                              "logprobs": self.job.kind.logprobs([], 0, prompt)}]) for i in range(self.job.params.n)]

    def chunk(self, text: str, entries: List[TokenLogprob], index: int = 0) -> str:
        before = ""
        if self.calls is not None:
            text, deltas = self.calls[index].feed(text)
            before = "".join(self._delta(index, d) for d in deltas)
            if not text:
                return before  # the rest is held: it may be a tool call
        lps = entries if self.job.params.logprobs is not None else None
        return before + self._event([self.job.kind.delta(self.job, index, text, lps)])

    def _delta(self, index: int, delta: Dict[str, Any]) -> str:
        return self._event([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])

    def error(self, finished: Finished) -> List[str]:
        """A failure ends the whole stream: an error object, then [DONE]."""
        err = grammar_failure(self.job, finished) or \
            APIError(500, finished.message, type="server_error", code="engine_failed")
        return [f"data: {json.dumps(err.body())}\n\n", DONE]

    def finish_choice(self, finished: Finished) -> str:
        """A choice's last chunk, with its finish_reason."""
        reason, before = finish_reason(finished), ""
        if self.calls is not None:
            text, deltas, called = self.calls[finished.index].finish()
            before = self._delta(finished.index, {"content": text}) if text else ""
            before += "".join(self._delta(finished.index, d) for d in deltas)
            reason = "tool_calls" if called and reason == "stop" else reason
        return before + self._event([self.job.kind.last(finished.index, reason)])

    def end(self, finished: Sequence[Finished]) -> List[str]:
        """After every choice has finished: the usage (when asked) and [DONE]."""
        events = [self._event([], usage=usage(finished))] if self.job.include_usage else []
        return events + [DONE]
