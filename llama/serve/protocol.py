"""OpenAI's API shapes: request bodies checked into engine requests, and the JSON of answers and errors.

Every check names the offending parameter, so a client gets the OpenAI-style error
`{"error": {"message", "type", "param", "code"}}` with status 400 (the openai client's BadRequestError).
Unknown fields are ignored (clients add new ones over time); known fields of the wrong type or out of range,
and features this server does not have (best_of > 1, tools...), are errors. Every error message is short (at
most MAX_MESSAGE characters: it never echoes a grammar or a body back), and every bound is in limits.py.
"""

from __future__ import annotations

import dataclasses

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..families.chat_format import UNSAFE_ERROR, validate_dialog
from ..families.codellama import infilling_prompt
from ..engine.grammar import Grammar
from ..generation import Llama
from ..tokenizer import TextStream, whole_char_end
from ..engine.params import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, MAX_SEED, MAX_TEMPERATURE, ParamError
from .limits import MAX_CHOICES, MAX_PROMPTS, MAX_STOP, MAX_STOP_CHARS
from ..engine.grammar import GrammarBusy, GrammarError
from ..engine.stop import StopText
from ..engine import Finished, SamplingParams, TokenLogprob, token_text
from . import tools as tool_calls

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat answers may fill the context
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limits
MAX_TOP_LOGPROBS = 20
MAX_MESSAGE = 700  # characters of an error message at most (with the rest of the error JSON: under 1 KB)
MAX_PARAM = 100  # characters of an error's `param` at most (a path into the body can hold the client's keys)
_TOKEN_ID = re.compile(r"-?[0-9]{1,12}", re.ASCII)  # a logit_bias key: ASCII digits (str.isdigit takes "²", "١")


class APIError(Exception):
    """An error answered to the client as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[Dict[str, str]] = None) -> None:
        message = message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 3] + "..."
        param = param if param is None or len(param) <= MAX_PARAM else param[:MAX_PARAM - 3] + "..."
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Job:
    """A checked request: what the engine runs and how the answer is shaped."""

    chat: bool
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


def parse_json(body: bytes) -> Dict[str, Any]:
    """The body as a JSON object. Strings holding a lone UTF-16 surrogate ("\\ud800", which JSON allows but
    Unicode text cannot hold) are refused here: nothing later could encode them."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise bad(f"the request body is not valid JSON: {str(err)[:200]}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad(f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    where = _surrogate(data, "")
    if where is not None:
        raise bad(f"the request body is not valid Unicode: {where or 'a key'} holds a lone UTF-16 surrogate",
                  param=where or None, code="invalid_json")
    return data


def _surrogate(value: Any, path: str) -> Optional[str]:
    """The path of the first string (or key) with a lone surrogate in a parsed JSON value, else None. The
    nesting is as deep as json.loads allowed; iterative, so any depth it allowed is walked."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(item, dict):
            for key, inner in item.items():
                name = f"{where}.{key}" if where else str(key)
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    return where
                stack.append((inner, name))
        elif isinstance(item, list):
            stack.extend((inner, f"{where}[{i}]") for i, inner in enumerate(item))
    return None


# --- typed getters: each names its parameter -----------------------------------------------------------------


def _get(body: Mapping[str, Any], name: str, kind: str, default: Any = None) -> Any:
    """body[name] checked to be of `kind` ('number', 'integer', 'boolean', 'string'); null means default."""
    value = body.get(name)
    if value is None:
        return default
    ok = {
        "number": isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "string": isinstance(value, str),
    }[kind]
    if not ok:
        raise bad(f"'{name}' must be a{'n' if kind[0] == 'i' else ''} {kind}, got {json.dumps(value)[:100]}",
                  param=name, code="invalid_type")
    return value


def _finite(value: float) -> bool:
    """A finite number that a float holds (a JSON integer of 400 digits does not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _unsupported(body: Mapping[str, Any], name: str, allowed: Sequence[Any], why: str) -> None:
    value = body.get(name)
    if value is not None and value not in allowed:
        raise bad(f"'{name}' {json.dumps(value)[:100]} is not supported: {why}", param=name, code="unsupported")


def _sampling(body: Mapping[str, Any], max_tokens: Optional[int], room: int, prompt_param: str,
              prompt_len: int, default_max: int, vocab_size: Optional[int] = None,
              max_param: str = "max_tokens") -> SamplingParams:
    """The request's sampling parameters, checked; max_param: the name the client gave max_tokens under."""
    temperature = _get(body, "temperature", "number", DEFAULT_TEMPERATURE)
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise bad(f"'temperature' must be in 0..{MAX_TEMPERATURE:g} (>= 0 and <= {MAX_TEMPERATURE:g}), got "
                  f"{temperature}", param="temperature")
    top_p = _get(body, "top_p", "number", DEFAULT_TOP_P)
    if not 0 < top_p <= 1:
        raise bad(f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    seed = _get(body, "seed", "integer")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise bad(f"'seed' must be in 0..{MAX_SEED} (64 bits), got {seed}", param="seed")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad("'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    if len(stop) > MAX_STOP:
        raise bad(f"'stop' may hold up to {MAX_STOP} strings, got {len(stop)}", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise bad(f"each 'stop' string may be up to {MAX_STOP_CHARS} characters long, got one of "
                  f"{max(map(len, stop))}", param="stop")
    StopText.prepare(stop)  # the stop strings' tables, built here (a worker thread), not on the engine thread
    n = _get(body, "n", "integer", 1)
    if not 1 <= n <= MAX_CHOICES:
        raise bad(f"'n' must be in 1..{MAX_CHOICES}, got {n}", param="n")
    extra = {name: _get(body, name, "number") for name in ("presence_penalty", "frequency_penalty", "min_p",
                                                           "repetition_penalty")}
    extra["top_k"] = _get(body, "top_k", "integer")
    if extra["top_k"] == -1:  # vLLM's spelling of "off"
        extra["top_k"] = 0
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict) or not all(isinstance(k, str) and _TOKEN_ID.fullmatch(k.strip())
                                                 for k in bias):
            raise bad("'logit_bias' must map token ids (as strings of ASCII digits) to numbers", param="logit_bias",
                      code="invalid_type")
        extra["logit_bias"] = {int(k): v for k, v in bias.items()}
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list):
            raise bad("'stop_token_ids' must be a list of token ids", param="stop_token_ids", code="invalid_type")
        extra["stop_token_ids"] = tuple(stop_ids)
    extra = {k: v for k, v in extra.items() if v is not None}
    if prompt_len >= room:
        raise bad(f"the prompt has {prompt_len} tokens, but this server's context (max_seq_len) is {room} "
                  f"tokens including the answer: shorten it to at most {room - 1}", param=prompt_param,
                  code="context_length_exceeded")
    left = room - prompt_len
    if max_tokens is None:
        max_tokens = min(default_max, left)
    elif max_tokens < 1:
        raise bad(f"'{max_param}' must be >= 1, got {max_tokens}", param=max_param)
    elif max_tokens > left:
        raise bad(f"'{max_param}' {max_tokens} does not fit: the prompt has {prompt_len} tokens and the context "
                  f"(max_seq_len) {room}, which leaves room for {left}", param=max_param,
                  code="context_length_exceeded")
    params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), seed=seed,
                            stop=tuple(stop), n=n, **extra)
    try:
        return params.check(vocab_size)
    except ParamError as err:
        raise bad(str(err), param=err.param) from None


def _common(body: Mapping[str, Any], model: str, generator: Optional[Llama] = None) -> Dict[str, Any]:
    """The fields every generation request has; `model` names the base or one of its LoRA adapters."""
    name = _get(body, "model", "string", model)
    slots = getattr(getattr(generator, "model", None), "lora_slots", None)
    adapters = slots.names if slots is not None else []
    if name != model and name not in adapters:
        served = f"{model!r}" + (f" and its LoRA adapters {adapters}" if adapters else "")
        raise APIError(404, f"the model {name!r} does not exist; this server serves {served}"[:400],
                       param="model", code="model_not_found")
    stream = _get(body, "stream", "boolean", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("'stream_options' must be an object", param="stream_options", code="invalid_type")
    include_usage = _get(options or {}, "include_usage", "boolean", False)
    _get(body, "user", "string")
    return {"model": name, "stream": stream, "include_usage": include_usage, "lora": None if name == model else name}


# --- the two endpoints -----------------------------------------------------------------------------------------


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


def completion_jobs(body: Mapping[str, Any], generator: Llama, model: str) -> List[Job]:
    """POST /v1/completions: each prompt (a string, token ids, or a list of either) continued; one job per
    prompt, answered as the choice of that index. echo with logprobs gives the prompt tokens' log-probs too
    (max_tokens 0: those alone), as evaluation harnesses ask."""
    common = _common(body, model, generator)
    prompts = _prompts(body.get("prompt"), generator)
    if len(prompts) > 1 and common["stream"]:
        raise bad("'stream' with a list of prompts is not supported: stream one prompt per request",
                  param="stream", code="unsupported")
    suffix = _get(body, "suffix", "string", "")
    _unsupported(body, "best_of", [1], "one answer per request")
    echo = _get(body, "echo", "boolean", False)
    logprobs = _get(body, "logprobs", "integer")
    if logprobs is not None and not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
        raise bad(f"'logprobs' must be in 0..{MAX_COMPLETION_LOGPROBS}, got {logprobs}", param="logprobs")
    grammar = _grammar(body, generator)
    max_tokens = _get(body, "max_tokens", "integer")
    if max_tokens == 0 and not echo:
        raise bad("'max_tokens' must be >= 1 (0 only with 'echo': the prompt's log-probs alone)", param="max_tokens")
    jobs = []
    for index, (tokens, text, sent) in enumerate(prompts):
        if suffix:  # fill in the middle (Code Llama): the answer is the text between the prompt and the suffix
            tokens = _infilling_tokens(generator, sent, suffix)
        params = _sampling(body, None if max_tokens == 0 else max_tokens, generator.max_seq_len, "prompt",
                           len(tokens), COMPLETION_MAX_TOKENS, generator.model.params.vocab_size)
        if suffix:
            stops = generator.infill_stops()
            params = dataclasses.replace(params, stop_token_ids=params.stop_token_ids + stops["stop_token_ids"],
                                         ignore_stop_ids=stops["ignore_stop_ids"])
        params = dataclasses.replace(params, logprobs=logprobs, prompt_logprobs=echo and logprobs is not None,
                                     grammar=grammar,
                                     max_tokens=0 if max_tokens == 0 else params.max_tokens)
        jobs.append(Job(chat=False, prompt=tokens, params=params, echo=text if echo else "", continues_prompt=True,
                        index=index, **common))
    if len(jobs) > 1:
        for job in jobs[1:]:
            job.id, job.created = jobs[0].id, jobs[0].created
    return jobs


def completion_job(body: Mapping[str, Any], generator: Llama, model: str) -> Job:
    """POST /v1/completions with one prompt (see completion_jobs)."""
    jobs = completion_jobs(body, generator, model)
    if len(jobs) != 1:
        raise bad("'prompt' must be one prompt here", param="prompt")
    return jobs[0]


GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_grammar": "grammar",
          "guided_choice": "choice"}  # vLLM's older names
STRUCTURED = {"json": "json_schema", "regex": "regex", "grammar": "grammar", "choice": "choice"}  # vLLM's


def _grammar(body: Mapping[str, Any], generator: Llama) -> Optional[Grammar]:
    """The answer's constraint, if any: OpenAI's `response_format` ({"type": "json_object"} or {"type":
    "json_schema", "json_schema": {"schema": ...}}), or vLLM's `structured_outputs` ({"json" | "regex" |
    "grammar" | "choice": ...}) and its older `guided_json` / `guided_regex` / `guided_grammar` /
    `guided_choice`. One at a time; a schema or grammar the engine cannot use is a 400 naming the parameter and
    the feature."""
    asked = []
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise bad("'response_format' must be {\"type\": \"text\" | \"json_object\" | \"json_schema\"}",
                      param="response_format", code="invalid_type")
        if fmt["type"] == "json_object":
            asked.append(("response_format", "json_schema", {"type": "object"}))
        elif fmt["type"] == "json_schema":
            inner = fmt.get("json_schema")
            if not isinstance(inner, dict) or not isinstance(inner.get("schema", {}), dict):
                raise bad("'response_format.json_schema' must be an object with a 'schema' object",
                          param="response_format.json_schema", code="invalid_type")
            asked.append(("response_format.json_schema.schema", "json_schema", inner.get("schema", {})))
    outputs = body.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, dict):
            raise bad("'structured_outputs' must be an object", param="structured_outputs", code="invalid_type")
        asked += [(f"structured_outputs.{k}", STRUCTURED[k], v) for k, v in outputs.items()
                  if k in STRUCTURED and v is not None]
    asked += [(name, kind, body[name]) for name, kind in GUIDED.items() if body.get(name) is not None]
    if not asked:
        return None
    if len(asked) > 1:
        raise bad(f"ask for one kind of structured output, got {', '.join(a[0] for a in asked)}", param=asked[1][0])
    param, kind, spec = asked[0]
    if body.get("stop"):
        raise bad("'stop' strings with structured output are not supported: they could cut the answer short",
                  param="stop", code="unsupported")
    try:
        grammar = Grammar.compile(kind, spec, generator.tokenizer, generator.stop_ids,
                                  generator.model.params.vocab_size)
    except ValueError as err:
        raise bad(f"'{param}' cannot be used: {err}", param=param, code="invalid_grammar") from None
    except GrammarBusy as err:
        raise APIError(429, str(err), param=param, code="grammar_busy", type="rate_limit_error",
                       headers={"Retry-After": "1"}) from None
    return dataclasses.replace(grammar, origin=param)


def grammar_failure(job: Job, finished: Finished) -> Optional[APIError]:
    """The 400 for an answer whose grammar's matcher failed mid-answer (a limit reached), else None: the
    client's grammar, not the server, is at fault, and only this request ended."""
    grammar = job.params.grammar
    if grammar is None or not finished.message.startswith(GrammarError.__name__ + ":"):
        return None
    message = finished.message[len(GrammarError.__name__) + 1:].strip()
    return bad(f"'{grammar.origin}': {message}", param=grammar.origin or None, code="grammar_failed")


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


def chat_job(body: Mapping[str, Any], generator: Llama, model: str) -> Job:
    """POST /v1/chat/completions: a dialog in the model family's chat format, answered by the assistant."""
    common = _common(body, model, generator)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of messages", param="messages",
                  code="invalid_type" if messages is not None and not isinstance(messages, list) else None)
    dialog = [_message(m, i) for i, m in enumerate(messages)]
    tools, choice, call_grammar = tool_calls.request_tools(body, generator)
    if generator.prompts.checks_tags and tools is None and tool_calls.plain(dialog):
        try:
            validate_dialog(dialog)
        except ValueError as err:
            raise bad(str(err).replace("dialog, ", ""), param="messages") from None
        if generator.formatter.has_special_tags(dialog):  # family seam: the family's own tags
            raise bad(UNSAFE_ERROR, param="messages", code="special_tags")
    grammar = _grammar(body, generator)
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
    max_tokens = _get(body, max_param, "integer")
    params = _sampling(body, max_tokens, generator.max_seq_len, "messages", len(tokens), generator.max_seq_len,
                       generator.model.params.vocab_size, max_param)
    if _get(body, "logprobs", "boolean", False):
        params = dataclasses.replace(params, logprobs=_get(body, "top_logprobs", "integer", 0))
        if not 0 <= params.logprobs <= MAX_TOP_LOGPROBS:
            raise bad(f"'top_logprobs' must be in 0..{MAX_TOP_LOGPROBS}, got {params.logprobs}",
                      param="top_logprobs")
    elif body.get("top_logprobs") is not None:
        raise bad("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    params = dataclasses.replace(params, grammar=grammar)
    return Job(chat=True, prompt=tokens, params=params, dialog=dialog, tools=tools, tool_choice=choice, **common)


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


def _message(message: Any, index: int) -> Dict[str, Any]:
    """One chat message (serve/tools.py: tool results and assistant tool calls included)."""
    return tool_calls.message(message, index)


# --- answers ---------------------------------------------------------------------------------------------------


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


def _completion_logprobs(entries: List[TokenLogprob], start: int, prompt: Sequence[TokenLogprob] = ()) \
        -> Dict[str, Any]:
    """OpenAI's completion log-probs; text_offset is where each token's text starts in the choice's text (after
    the echoed prompt, `start` characters long). prompt: the echoed prompt's entries, first (a null log-prob
    and null alternatives for its first token)."""
    return {"tokens": [e.token for e in prompt] + [e.token for e in entries],
            "token_logprobs": [e.logprob for e in prompt] + [e.logprob for e in entries],
            "top_logprobs": [None if e.logprob is None else {t: lp for t, _, lp in e.top} for e in prompt] +
                            [{t: lp for t, _, lp in e.top} for e in entries],
            "text_offset": [e.offset for e in prompt] + [start + e.offset for e in entries]}


def _chat_logprobs(entries: List[TokenLogprob]) -> Dict[str, Any]:
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, b, lp in e.top]}
                        for e in entries]}


def _finish_reason(finished: Finished) -> str:
    """OpenAI's finish_reason: 'length' also for an answer the server cut short (a drain that timed out)."""
    return "length" if finished.reason in ("length", "abort") else "stop"


def response(job: Job, texts: List[str], entries: List[List[TokenLogprob]], finished: List[Finished],
             prompt: Sequence[TokenLogprob] = ()) -> Dict[str, Any]:
    """The non-streamed answer: one choice per index (n choices share the prompt; with a list of prompts, the
    choices of prompt k are k*n..k*n+n-1). prompt: the echoed prompt's log-prob entries, when asked."""
    want_lps = job.params.logprobs is not None
    choices = []
    for i, (text, lps, end) in enumerate(zip(texts, entries, finished)):
        index = job.index * job.params.n + i
        reason = _finish_reason(end)
        if job.chat:
            message = {"role": "assistant", "content": text}
            if job.tool_choice != "none":
                message, reason = tool_calls.answer(text, reason)
            choice = {"index": index, "message": message, "logprobs": _chat_logprobs(lps) if want_lps else None}
        else:
            choice = {"index": index, "text": job.echo + text,
                      "logprobs": _completion_logprobs(lps, len(job.echo), prompt) if want_lps else None}
        choice["finish_reason"] = reason
        choices.append(choice)
    obj, prefix = ("chat.completion", "chatcmpl-") if job.chat else ("text_completion", "cmpl-")
    return {"id": prefix + job.id, "object": obj, "created": job.created, "model": job.model, "choices": choices,
            "usage": usage(finished)}


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
        self.calls = [tool_calls.StreamedCalls(job.tool_choice not in ("auto", "none"))
                      for _ in range(job.params.n)] if job.chat and job.tool_choice != "none" else None

    def _event(self, choices: List[Dict[str, Any]], **extra: Any) -> str:
        obj = "chat.completion.chunk" if self.job.chat else "text_completion"
        prefix = "chatcmpl-" if self.job.chat else "cmpl-"
        payload = {"id": prefix + self.job.id, "object": obj, "created": self.job.created, "model": self.job.model,
                   "choices": choices, **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def start(self) -> List[str]:
        """What opens the stream: the assistant role (chat), the echoed prompt (completions with echo), for each
        choice."""
        n = self.job.params.n
        if self.job.chat:
            return [self._event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]) for i in range(n)]
        if self.job.echo and not self.job.params.prompt_logprobs:
            return [self._event([{"index": i, "text": self.job.echo, "logprobs": None, "finish_reason": None}])
                    for i in range(n)]
        return []

    def echo(self, prompt: List[TokenLogprob]) -> List[str]:
        """The echoed prompt with its log-probs, for each choice (the engine's first chunk carries them)."""
        return [self._event([{"index": i, "text": self.job.echo, "finish_reason": None,
                              "logprobs": _completion_logprobs([], 0, prompt)}]) for i in range(self.job.params.n)]

    def chunk(self, text: str, entries: List[TokenLogprob], index: int = 0) -> str:
        want_lps = self.job.params.logprobs is not None
        before = ""
        if self.calls is not None:
            text, deltas = self.calls[index].feed(text)
            before = "".join(self._delta(index, d) for d in deltas)
            if not text:
                return before  # the rest is held: it may be a tool call
        if self.job.chat:
            choice = {"index": index, "delta": {"content": text},
                      "logprobs": _chat_logprobs(entries) if want_lps else None, "finish_reason": None}
        else:
            choice = {"index": index, "text": text,
                      "logprobs": _completion_logprobs(entries, len(self.job.echo)) if want_lps else None,
                      "finish_reason": None}
        return before + self._event([choice])

    def _delta(self, index: int, delta: Dict[str, Any]) -> str:
        return self._event([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])

    def error(self, finished: Finished) -> List[str]:
        """A failure ends the whole stream: an error object, then [DONE]."""
        err = grammar_failure(self.job, finished) or \
            APIError(500, finished.message, type="server_error", code="engine_failed")
        return [f"data: {json.dumps(err.body())}\n\n", "data: [DONE]\n\n"]

    def finish_choice(self, finished: Finished) -> str:
        """A choice's last chunk, with its finish_reason."""
        reason, before = _finish_reason(finished), ""
        if self.calls is not None:
            text, deltas, called = self.calls[finished.index].finish()
            before = self._delta(finished.index, {"content": text}) if text else ""
            before += "".join(self._delta(finished.index, d) for d in deltas)
            reason = "tool_calls" if called and reason == "stop" else reason
        last = {"index": finished.index, "finish_reason": reason, "logprobs": None}
        last.update({"delta": {}} if self.job.chat else {"text": ""})
        return before + self._event([last])

    def end(self, finished: Sequence[Finished]) -> List[str]:
        """After every choice has finished: the usage (when asked) and [DONE]."""
        events = [self._event([], usage=usage(finished))] if self.job.include_usage else []
        return events + ["data: [DONE]\n\n"]
