"""The fields every generation request shares, read from a JSON body and checked: typed getters that name their
parameter, the sampling parameters, the model and streaming options, and structured output (a grammar).

Unknown fields are ignored (clients add new ones over time); known fields of the wrong type or out of range,
and features this server does not have, are 400s naming the field (errors.py). Every bound is in limits.py or
llama/engine/params.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Dict, Mapping, Optional, Sequence

from ..engine import SamplingParams
from ..engine.grammar import Grammar, GrammarBusy
from ..engine.params import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, MAX_SEED, MAX_TEMPERATURE, ParamError
from ..engine.stop import StopText
from ..generation import Llama
from .errors import APIError, bad
from .limits import MAX_CHOICES, MAX_STOP, MAX_STOP_CHARS

_TOKEN_ID = re.compile(r"-?[0-9]{1,12}", re.ASCII)  # a logit_bias key: ASCII digits (str.isdigit takes "²", "١")
GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_grammar": "grammar",
          "guided_choice": "choice"}  # vLLM's older names
STRUCTURED = {"json": "json_schema", "regex": "regex", "grammar": "grammar", "choice": "choice"}  # vLLM's


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


def get(body: Mapping[str, Any], name: str, kind: str, default: Any = None) -> Any:
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


def unsupported(body: Mapping[str, Any], name: str, allowed: Sequence[Any], why: str) -> None:
    value = body.get(name)
    if value is not None and value not in allowed:
        raise bad(f"'{name}' {json.dumps(value)[:100]} is not supported: {why}", param=name, code="unsupported")


def sampling(body: Mapping[str, Any], max_tokens: Optional[int], room: int, prompt_param: str,
             prompt_len: int, default_max: int, vocab_size: Optional[int] = None,
             max_param: str = "max_tokens") -> SamplingParams:
    """The request's sampling parameters, checked; max_param: the name the client gave max_tokens under."""
    temperature = get(body, "temperature", "number", DEFAULT_TEMPERATURE)
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise bad(f"'temperature' must be in 0..{MAX_TEMPERATURE:g} (>= 0 and <= {MAX_TEMPERATURE:g}), got "
                  f"{temperature}", param="temperature")
    top_p = get(body, "top_p", "number", DEFAULT_TOP_P)
    if not 0 < top_p <= 1:
        raise bad(f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    seed = get(body, "seed", "integer")
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
    n = get(body, "n", "integer", 1)
    if not 1 <= n <= MAX_CHOICES:
        raise bad(f"'n' must be in 1..{MAX_CHOICES}, got {n}", param="n")
    extra = {name: get(body, name, "number") for name in ("presence_penalty", "frequency_penalty", "min_p",
                                                           "repetition_penalty")}
    extra["top_k"] = get(body, "top_k", "integer")
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


def common(body: Mapping[str, Any], model: str, generator: Optional[Llama] = None) -> Dict[str, Any]:
    """The fields every generation request has; `model` names the base or one of its LoRA adapters."""
    name = get(body, "model", "string", model)
    slots = getattr(getattr(generator, "model", None), "lora_slots", None)
    adapters = slots.names if slots is not None else []
    if name != model and name not in adapters:
        served = f"{model!r}" + (f" and its LoRA adapters {adapters}" if adapters else "")
        raise APIError(404, f"the model {name!r} does not exist; this server serves {served}"[:400],
                       param="model", code="model_not_found")
    stream = get(body, "stream", "boolean", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("'stream_options' must be an object", param="stream_options", code="invalid_type")
    include_usage = get(options or {}, "include_usage", "boolean", False)
    get(body, "user", "string")
    return {"model": name, "stream": stream, "include_usage": include_usage, "lora": None if name == model else name}


def structured(body: Mapping[str, Any], generator: Llama) -> Optional[Grammar]:
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

