"""Requests: an OpenAI request body checked into Jobs, each carrying its endpoint's kind.

    POST /v1/completions        COMPLETION.jobs: one job per prompt (a string, token ids, or a list of either)
    POST /v1/chat/completions   CHAT.jobs: one job, the dialog in the server's chat format

A kind object (Completion, Chat) holds everything the two endpoints differ in: how a body becomes jobs, and
the answer's shape (object names, a choice's `text` or `message`, the log-probs' format, tool calls), which
responses.py asks of `job.kind` instead of branching. The shared fields are read in fields.py.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..engine import SamplingParams, TokenLogprob
from ..families.chat_format import UNSAFE_ERROR, validate_dialog
from ..families.codellama import infilling_prompt
from ..generation import Llama
from ..tokenizer import whole_char_end
from . import tools as tool_calls
from .errors import bad
from .fields import common, get, sampling, structured, unsupported
from .limits import MAX_PROMPTS

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat answers may fill the context
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limits
MAX_TOP_LOGPROBS = 20


@dataclass
class Job:
    """A checked request: what the engine runs and how the answer is shaped (by its kind)."""

    kind: "Kind"
    model: str
    prompt: List[int]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo: str = ""  # completions with echo: the prompt text, put before the answer
    dialog: Optional[List[Dict[str, Any]]] = None  # chat: the messages (a --shield checks them)
    tools: Optional[List[Dict[str, Any]]] = None  # chat: the declared tools (serve/tools.py)
    tool_choice: str = "none"  # 'none': the answer is text; else it may be (auto) or is (required, a name) a call
    continues_prompt: bool = False  # completions: the answer's text continues the prompt's (Request's flag)
    index: int = 0  # completions with a list of prompts: which prompt (the choice's index)
    lora: Optional[str] = None  # the LoRA adapter the request's `model` names (None: the base)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


# --- the kinds ---------------------------------------------------------------------------------------------------


class Kind:
    """What one endpoint does its own way. `object`, `chunk_object`: the answer's and a streamed chunk's
    "object"; `id_prefix`: its id's. The choice methods return OpenAI's choice objects, keys in its order."""

    object = chunk_object = id_prefix = ""

    def jobs(self, body: Mapping[str, Any], generator: Llama, model: str) -> List[Job]:
        """The body's jobs (400 naming the first bad field)."""
        raise NotImplementedError

    def logprobs(self, entries: Sequence[TokenLogprob], start: int = 0,
                 prompt: Sequence[TokenLogprob] = ()) -> Dict[str, Any]:
        """The answer's log-probs in this endpoint's format."""
        raise NotImplementedError

    def choice(self, job: Job, index: int, text: str, entries: Optional[Sequence[TokenLogprob]],
               prompt: Sequence[TokenLogprob], reason: str) -> Dict[str, Any]:
        """A whole answer's choice (entries: None when no log-probs were asked)."""
        raise NotImplementedError

    def opening(self, job: Job, index: int) -> Optional[Dict[str, Any]]:
        """The choice that opens a stream, if any."""
        return None

    def delta(self, job: Job, index: int, text: str, entries: Optional[Sequence[TokenLogprob]]) -> Dict[str, Any]:
        """A streamed chunk's choice."""
        raise NotImplementedError

    def last(self, index: int, reason: str) -> Dict[str, Any]:
        """A streamed choice's last chunk, with its finish_reason."""
        raise NotImplementedError

    def streamed_calls(self, job: Job) -> Optional[List[tool_calls.StreamedCalls]]:
        """Per choice, the reader of tool calls out of the streamed text (None: the text is sent as it comes)."""
        return None


class Completion(Kind):
    """POST /v1/completions: text continued; `text` choices, OpenAI's legacy log-probs with text offsets."""

    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def jobs(self, body: Mapping[str, Any], generator: Llama, model: str) -> List[Job]:
        return completion_jobs(body, generator, model)

    def logprobs(self, entries: Sequence[TokenLogprob], start: int = 0,
                 prompt: Sequence[TokenLogprob] = ()) -> Dict[str, Any]:
        """text_offset is where each token's text starts in the choice's text (after the echoed prompt, `start`
        characters long). prompt: the echoed prompt's entries, first (a null log-prob and null alternatives for
        its first token)."""
        return {"tokens": [e.token for e in prompt] + [e.token for e in entries],
                "token_logprobs": [e.logprob for e in prompt] + [e.logprob for e in entries],
                "top_logprobs": [None if e.logprob is None else {t: lp for t, _, lp in e.top} for e in prompt] +
                                [{t: lp for t, _, lp in e.top} for e in entries],
                "text_offset": [e.offset for e in prompt] + [start + e.offset for e in entries]}

    def choice(self, job: Job, index: int, text: str, entries: Optional[Sequence[TokenLogprob]],
               prompt: Sequence[TokenLogprob], reason: str) -> Dict[str, Any]:
        return {"index": index, "text": job.echo + text,
                "logprobs": None if entries is None else self.logprobs(entries, len(job.echo), prompt),
                "finish_reason": reason}

    def opening(self, job: Job, index: int) -> Optional[Dict[str, Any]]:
        if job.echo and not job.params.prompt_logprobs:  # with log-probs the engine's first chunk brings it
            return {"index": index, "text": job.echo, "logprobs": None, "finish_reason": None}
        return None

    def delta(self, job: Job, index: int, text: str, entries: Optional[Sequence[TokenLogprob]]) -> Dict[str, Any]:
        return {"index": index, "text": text,
                "logprobs": None if entries is None else self.logprobs(entries, len(job.echo)),
                "finish_reason": None}

    def last(self, index: int, reason: str) -> Dict[str, Any]:
        return {"index": index, "finish_reason": reason, "logprobs": None, "text": ""}


class Chat(Kind):
    """POST /v1/chat/completions: an assistant's turn; `message` choices and `delta` chunks, tool calls."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def jobs(self, body: Mapping[str, Any], generator: Llama, model: str) -> List[Job]:
        return [chat_job(body, generator, model)]

    def logprobs(self, entries: Sequence[TokenLogprob], start: int = 0,
                 prompt: Sequence[TokenLogprob] = ()) -> Dict[str, Any]:
        return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
                             "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, b, lp in e.top]}
                            for e in entries]}

    def choice(self, job: Job, index: int, text: str, entries: Optional[Sequence[TokenLogprob]],
               prompt: Sequence[TokenLogprob], reason: str) -> Dict[str, Any]:
        message = {"role": "assistant", "content": text}
        if job.tool_choice != "none":
            message, reason = tool_calls.answer(text, reason)
        return {"index": index, "message": message, "logprobs": None if entries is None else self.logprobs(entries),
                "finish_reason": reason}

    def opening(self, job: Job, index: int) -> Optional[Dict[str, Any]]:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def delta(self, job: Job, index: int, text: str, entries: Optional[Sequence[TokenLogprob]]) -> Dict[str, Any]:
        return {"index": index, "delta": {"content": text},
                "logprobs": None if entries is None else self.logprobs(entries), "finish_reason": None}

    def last(self, index: int, reason: str) -> Dict[str, Any]:
        return {"index": index, "finish_reason": reason, "logprobs": None, "delta": {}}

    def streamed_calls(self, job: Job) -> Optional[List[tool_calls.StreamedCalls]]:
        if job.tool_choice == "none":
            return None
        return [tool_calls.StreamedCalls(job.tool_choice != "auto") for _ in range(job.params.n)]


COMPLETION, CHAT = Completion(), Chat()


# --- completions -------------------------------------------------------------------------------------------------


def _prompts(prompt: Any, generator: Llama) -> List[Tuple[List[int], str, Any]]:
    """The completion's prompts as (tokens, text, the prompt as sent): a string, a list of token ids, or a list
    of either kind (not both); the text of a token prompt is that of its whole characters, which the answer's
    text continues."""
    ids = lambda p: isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool)
                                                              for t in p)
    if isinstance(prompt, str) or ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt) or all(map(ids, prompt))):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids(p) for p in prompt):
        raise bad("'prompt' mixes strings and token-id lists: send a list of one kind", param="prompt",
                  code="invalid_type")
    else:
        raise bad("'prompt' must be a string, a non-empty list of token ids, or a list of either", param="prompt",
                  code="invalid_type" if prompt is not None else None)
    if len(prompts) > MAX_PROMPTS:
        raise bad(f"'prompt' may hold up to {MAX_PROMPTS} prompts, got {len(prompts)}", param="prompt")
    vocab = generator.model.params.vocab_size
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append((generator.tokenizer.encode(p, bos=True, eos=False), p, p))
        elif not all(0 <= t < vocab for t in p):
            raise bad(f"'prompt' has token ids outside 0..{vocab - 1}", param="prompt")
        else:
            tokens = list(p)
            out.append((tokens, generator.tokenizer.decode(tokens[:whole_char_end(generator.tokenizer, tokens)]), p))
    return out


def _infilling_tokens(generator: Llama, prompt: Any, suffix: str) -> List[int]:
    """The prompt of a completion with a `suffix` (OpenAI's legacy fill-in-the-middle), in the family's format."""
    if not generator.family.infilling:
        raise bad(f"'suffix' (fill in the middle) needs a Code Llama model; this server runs "
                  f"{generator.family.title}", param="suffix", code="unsupported")
    if not isinstance(prompt, str):
        raise bad("'suffix' needs the prompt as a string", param="prompt", code="invalid_type")
    try:
        return infilling_prompt(generator.tokenizer, prompt, suffix)
    except ValueError as err:
        raise bad(str(err), param="suffix", code="unsupported") from None


def completion_jobs(body: Mapping[str, Any], generator: Llama, model: str) -> List[Job]:
    """POST /v1/completions: each prompt (a string, token ids, or a list of either) continued; one job per
    prompt, answered as the choice of that index. echo with logprobs gives the prompt tokens' log-probs too
    (max_tokens 0: those alone), as evaluation harnesses ask."""
    shared = common(body, model, generator)
    prompts = _prompts(body.get("prompt"), generator)
    if len(prompts) > 1 and shared["stream"]:
        raise bad("'stream' with a list of prompts is not supported: stream one prompt per request",
                  param="stream", code="unsupported")
    suffix = get(body, "suffix", "string", "")
    unsupported(body, "best_of", [1], "one answer per request")
    echo = get(body, "echo", "boolean", False)
    logprobs = get(body, "logprobs", "integer")
    if logprobs is not None and not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
        raise bad(f"'logprobs' must be in 0..{MAX_COMPLETION_LOGPROBS}, got {logprobs}", param="logprobs")
    grammar = structured(body, generator)
    max_tokens = get(body, "max_tokens", "integer")
    if max_tokens == 0 and not echo:
        raise bad("'max_tokens' must be >= 1 (0 only with 'echo': the prompt's log-probs alone)", param="max_tokens")
    jobs = []
    for index, (tokens, text, sent) in enumerate(prompts):
        if suffix:  # fill in the middle (Code Llama): the answer is the text between the prompt and the suffix
            tokens = _infilling_tokens(generator, sent, suffix)
        params = sampling(body, None if max_tokens == 0 else max_tokens, generator.max_seq_len, "prompt",
                          len(tokens), COMPLETION_MAX_TOKENS, generator.model.params.vocab_size)
        if suffix:
            stops = generator.infill_stops()
            params = dataclasses.replace(params, stop_token_ids=params.stop_token_ids + stops["stop_token_ids"],
                                         ignore_stop_ids=stops["ignore_stop_ids"])
        params = dataclasses.replace(params, logprobs=logprobs, prompt_logprobs=echo and logprobs is not None,
                                     grammar=grammar,
                                     max_tokens=0 if max_tokens == 0 else params.max_tokens)
        jobs.append(Job(kind=COMPLETION, prompt=tokens, params=params, echo=text if echo else "",
                        continues_prompt=True, index=index, **shared))
    if len(jobs) > 1:
        for job in jobs[1:]:
            job.id, job.created = jobs[0].id, jobs[0].created
    return jobs


# --- chat --------------------------------------------------------------------------------------------------------


def chat_job(body: Mapping[str, Any], generator: Llama, model: str) -> Job:
    """POST /v1/chat/completions: a dialog in the model family's chat format, answered by the assistant."""
    shared = common(body, model, generator)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of messages", param="messages",
                  code="invalid_type" if messages is not None and not isinstance(messages, list) else None)
    dialog = [tool_calls.message(m, i) for i, m in enumerate(messages)]
    tools, choice, call_grammar = tool_calls.request_tools(body, generator)
    if generator.prompts.checks_tags and tools is None and tool_calls.plain(dialog):
        try:
            validate_dialog(dialog)
        except ValueError as err:
            raise bad(str(err).replace("dialog, ", ""), param="messages") from None
        if generator.formatter.has_special_tags(dialog):  # family seam: the family's own tags
            raise bad(UNSAFE_ERROR, param="messages", code="special_tags")
    grammar = structured(body, generator)
    if call_grammar is not None:
        if grammar is not None:
            raise bad(f"'tool_choice' {choice!r} constrains the answer to a tool call: it cannot be combined with "
                      "'response_format' or structured outputs", param="tool_choice")
        if body.get("stop"):
            raise bad("'stop' strings with a required or named 'tool_choice' are not supported: they could cut "
                      "the call short", param="stop", code="unsupported")
        grammar = call_grammar
    tokens = chat_prompt(generator, dialog, tools, body)
    max_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = get(body, max_param, "integer")
    params = sampling(body, max_tokens, generator.max_seq_len, "messages", len(tokens), generator.max_seq_len,
                      generator.model.params.vocab_size, max_param)
    if get(body, "logprobs", "boolean", False):
        params = dataclasses.replace(params, logprobs=get(body, "top_logprobs", "integer", 0))
        if not 0 <= params.logprobs <= MAX_TOP_LOGPROBS:
            raise bad(f"'top_logprobs' must be in 0..{MAX_TOP_LOGPROBS}, got {params.logprobs}",
                      param="top_logprobs")
    elif body.get("top_logprobs") is not None:
        raise bad("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    params = dataclasses.replace(params, grammar=grammar)
    return Job(kind=CHAT, prompt=tokens, params=params, dialog=dialog, tools=tools, tool_choice=choice, **shared)


def chat_prompt(generator: Llama, dialog: List[Dict[str, Any]], tools: Optional[List[Dict[str, Any]]],
                body: Mapping[str, Any]) -> List[int]:
    """The chat's prompt tokens in the server's format (chat template or Meta's, llama/families/prompting.py);
    `chat_template_kwargs` (vLLM's) go to the template. A conversation the format refuses: 400."""
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise bad("'chat_template_kwargs' must be an object", param="chat_template_kwargs", code="invalid_type")
    try:
        return generator.prompts.encode(dialog, tools, **kwargs)
    except ValueError as err:
        raise bad(str(err)[:500], param=getattr(err, "param", "messages")) from None
