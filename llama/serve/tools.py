"""Tool calling over OpenAI's chat API: the request's messages, tools and tool_choice checked into a prompt and
a constraint, and the answer's text turned into tool calls (whole or streamed).

    tools          [{"type": "function", "function": {"name", "description", "parameters": JSON schema}}]
    tool_choice    "auto" (default with tools: the model may answer in text), "none" (text; the tools are still
                   shown to the model, as vLLM does), "required" or {"type": "function", "function": {"name"}}:
                   the answer is grammar-constrained (llama/engine/grammar.py) to one call
                   {"name": ..., "parameters": ...} whose name is declared and whose arguments follow its schema
    messages       also "tool" messages (results) and assistant messages with "tool_calls" and content null

Every tool's schema is compiled when the request arrives, so a schema the engine cannot use is a 400 naming
tools[i].function.parameters. The answer is read as vLLM's llama3_json parser reads it (llama/families/tools.py):
calls give message.tool_calls, content null and finish_reason "tool_calls". Streamed, calls go out as tool-call
deltas (id and name, then arguments) that the openai client assembles (StreamedCalls).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..engine.grammar import Grammar, GrammarBusy
from ..families.tools import ToolCall, ToolError, call_schema, check_tool_choice, check_tools, looks_like_call, \
    parse, parameters
from .errors import APIError, bad


def bad_request(message: str, param: str, code: Optional[str] = None) -> APIError:
    return bad(message, param=param, code=code)


def message(raw: Any, index: int) -> Dict[str, Any]:
    """One chat message: role, content (a string, text parts joined, or null on an assistant message with
    tool_calls), and for tools tool_calls / tool_call_id / name."""
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise bad_request(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
    role, content = raw.get("role"), raw.get("content")
    role = "system" if role == "developer" else role  # OpenAI's newer name for the system message
    if role not in ("system", "user", "assistant", "tool", "ipython"):
        raise bad_request(f"{where}.role must be 'system', 'user', 'assistant' or 'tool', got "
                          f"{json.dumps(role)[:100]}", f"{where}.role")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    out: Dict[str, Any] = {"role": role, "content": content}
    calls = raw.get("tool_calls")
    if calls is not None and role == "assistant":
        if not isinstance(calls, list) or not all(_call_ok(c) for c in calls):
            raise bad_request(f"{where}.tool_calls must be a list of {{\"id\", \"type\": \"function\", \"function\": "
                              "{\"name\", \"arguments\": JSON text}}", f"{where}.tool_calls", "invalid_type")
        if calls:
            out["tool_calls"] = [{"id": c.get("id", ""), "type": "function",
                                  "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
                                 for c in calls]
    if content is None and "tool_calls" in out:
        return out
    if not isinstance(content, str):
        raise bad_request(f"{where}.content must be a string (or a list of text parts)", f"{where}.content",
                          "invalid_type")
    for key in ("tool_call_id", "name"):
        if role in ("tool", "ipython") and isinstance(raw.get(key), str):
            out[key] = raw[key]
    return out


def _call_ok(call: Any) -> bool:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return False
    try:
        return isinstance(json.loads(function.get("arguments")), dict)
    except (TypeError, ValueError):
        return False


def plain(messages: List[Dict[str, Any]]) -> bool:
    """Only system/user/assistant text messages (Meta's plain chat formats take these)."""
    return all(m["role"] in ("system", "user", "assistant") and "tool_calls" not in m for m in messages)


def request_tools(body: Mapping[str, Any], generator: Any) -> Tuple[Optional[List[Dict[str, Any]]], str,
                                                                    Optional[Grammar]]:
    """(tools, tool_choice, the call's grammar for required / named) of a request; 400 naming the field."""
    if body.get("functions"):  # [] is no functions
        raise bad_request("'functions' (OpenAI's older API) is not supported: send 'tools'", "functions",
                          "unsupported")
    tools = body.get("tools")
    try:
        tools = check_tools(tools) if tools is not None else None
        choice = check_tool_choice(body.get("tool_choice"), tools or [])
    except ToolError as err:
        raise bad_request(str(err), err.param) from None
    if not tools:
        return None, "none", None
    for i, tool in enumerate(tools):  # every schema must compile: a bad one is the caller's to fix
        param = f"tools[{i}].function.parameters"
        try:
            _compile(parameters(tool), generator, param)
        except ValueError as err:
            if "llguidance" in str(err):
                break  # no structured-output engine: schemas unchecked (auto and none still work)
            raise bad_request(f"{param} cannot be used: {err}", param, "invalid_schema") from None
    grammar = None
    if choice not in ("auto", "none"):
        try:
            grammar = _compile(call_schema(tools, None if choice == "required" else choice), generator, "tool_choice")
        except ValueError as err:
            raise bad_request(f"'tool_choice' {choice!r} cannot be constrained: {err}", "tool_choice") from None
    return tools, choice, grammar


def _compile(schema: Dict[str, Any], generator: Any, param: str) -> Grammar:
    """A JSON schema compiled for the generator's tokenizer (its failures named by `param`); 429 when every
    grammar worker stays busy."""
    try:
        grammar = Grammar.compile("json_schema", schema, generator.tokenizer, generator.stop_ids,
                                  generator.model.params.vocab_size)
    except GrammarBusy as err:
        raise APIError(429, str(err), param=param, code="grammar_busy", type="rate_limit_error",
                       headers={"Retry-After": "1"}) from None
    return dataclasses.replace(grammar, origin=param)


def answer(text: str, finish_reason: str) -> Tuple[Dict[str, Any], str]:
    """The choice's message and finish_reason for an answer that may call tools."""
    content, calls = parse(text)
    if not calls:
        return {"role": "assistant", "content": text}, finish_reason
    message = {"role": "assistant", "content": None, "tool_calls": [c.as_openai() for c in calls]}
    return message, "tool_calls" if finish_reason == "stop" else finish_reason


_HEAD = re.compile(r'\s*(?:<\|python_tag\|>)?\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*'
                   r'"(?:parameters|arguments)"\s*:\s*(?=\{)')


class StreamedCalls:
    """One streamed choice. auto: text passes through until the answer starts like a call; then it is held and
    sent as tool-call deltas when the choice ends (or as text, when it was not a call after all). required or a
    named function (the grammar makes the answer one call): the call's id and name go out as soon as the name is
    complete, then its arguments as they are written."""

    def __init__(self, always: bool) -> None:
        self.always = always
        self.held: List[str] = []
        self.decided: Optional[bool] = True if always else None
        self.call: Optional[ToolCall] = None  # constrained: the call being streamed
        self.args_at, self.sent, self.depth, self.in_string, self.escaped = 0, 0, 0, False, False

    def feed(self, text: str) -> Tuple[str, List[Dict[str, Any]]]:
        """(text to send now, tool-call deltas to send now)."""
        if self.decided is False:
            return text, []
        self.held.append(text)
        if self.decided is None:
            self.decided = looks_like_call("".join(self.held))
            if self.decided is False:
                out, self.held = "".join(self.held), []
                return out, []
        return "", self._progress() if self.always else []

    def _progress(self) -> List[Dict[str, Any]]:
        """Constrained: the deltas the held text allows now (the name once whole; the arguments so far)."""
        text = "".join(self.held)
        deltas = []
        if self.call is None:
            match = _HEAD.match(text)
            if match is None:
                return []
            self.call = ToolCall(json.loads(f'"{match.group(1)}"'), "")
            self.args_at = self.sent = match.end()
            deltas.append({"tool_calls": [{"index": 0, "id": self.call.id, "type": "function",
                                           "function": {"name": self.call.name, "arguments": ""}}]})
        end = self._args_end(text)
        if end > self.sent:
            piece, self.sent = text[self.sent:end], end
            self.call.arguments += piece
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        return deltas

    def _args_end(self, text: str) -> int:
        """How far the arguments object reaches in `text` (to its closing brace, not past it)."""
        at = self.sent
        if self.depth == 0 and at > self.args_at:
            return at  # closed already
        while at < len(text):
            char = text[at]
            at += 1
            if self.in_string:
                self.escaped, self.in_string = (False, True) if self.escaped else (char == "\\", char != '"')
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return at
        return at

    def finish(self) -> Tuple[str, List[Dict[str, Any]], bool]:
        """(text still to send, tool-call deltas still to send, whether the answer was a call) at the end."""
        text, self.held = "".join(self.held), []
        if self.call is not None:
            return "", [], bool(parse(text)[1])
        if not text:
            return "", [], False
        content, calls = parse(text)
        return ("", call_deltas(calls), True) if calls else (text, [], False)


def call_deltas(calls: List[ToolCall]) -> List[Dict[str, Any]]:
    """The deltas of finished calls, as OpenAI streams them: per call its id, type and name, then its arguments."""
    deltas = []
    for i, call in enumerate(calls):
        deltas.append({"tool_calls": [{"index": i, "id": call.id, "type": "function",
                                       "function": {"name": call.name, "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]})
    return deltas
