"""Tool calling for Llama 3.1 and later: the tools' checks, Meta's JSON tool-call prompt, and reading calls out
of an answer.

Prompt (a checkpoint without a chat template; with one, the template renders the tools): Meta's Llama 3.1 JSON
format, as the published 3.1 / 3.2 / 3.3 templates write it. The system message opens with "Environment:
ipython", the knowledge and today's dates, then the system text; the tools go into the first user message after
the instruction to answer with {"name": function name, "parameters": dictionary of argument name and its value},
each tool as indented JSON; an assistant's earlier calls are written as that JSON (several joined by "; "); tool
results come back as `ipython` messages (a string result as a JSON string, as the templates' tojson writes it).

Reading an answer, as vLLM's llama3_json parser does: an answer is a call when it holds a JSON object with a
"name" and "parameters" (or "arguments") object, optionally after <|python_tag|>; several calls are separated by
";". Anything else, or JSON that does not parse as calls, is plain text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..tokenizers import BaseTokenizer

PYTHON_TAG = "<|python_tag|>"
TOOL_ROLES = ("tool", "ipython")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_INSTRUCTION = ("Given the following functions, please respond with a JSON for a function call with its proper "
                "arguments that best answers the given prompt.\n\n"
                'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
                'value}.Do not use variables.\n\n')


class ToolError(ValueError):
    """A bad tool, tool choice or tool message; `param` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ToolCall:
    """One call the model made: the function's name and its arguments as JSON text (OpenAI's shape)."""

    name: str
    arguments: str
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"chatcmpl-tool-{uuid.uuid4().hex}"

    def as_openai(self) -> Dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def check_tools(tools: Any, param: str = "tools") -> List[Dict[str, Any]]:
    """OpenAI's tools ([{"type": "function", "function": {"name", "description", "parameters"}}]) checked; a
    ToolError names the first bad field."""
    if not isinstance(tools, list):
        raise ToolError(f"'{param}' must be a list of tools", param)
    seen = set()
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ToolError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}", f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ToolError(f"{where}.function must be an object with a 'name'", f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.', got "
                            f"{json.dumps(name)[:80]}", f"{where}.function.name")
        if name in seen:
            raise ToolError(f"{where}.function.name {name!r} is declared twice", f"{where}.function.name")
        seen.add(name)
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise ToolError(f"{where}.function.description must be a string", f"{where}.function.description")
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise ToolError(f"{where}.function.parameters must be a JSON schema object",
                            f"{where}.function.parameters")
    return tools


def check_tool_choice(choice: Any, tools: Sequence[Mapping[str, Any]]) -> str:
    """'none', 'auto', 'required' or the name of a declared function (OpenAI's {"type": "function",
    "function": {"name": ...}}); default 'auto' with tools and 'none' without."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ToolError(f"'tool_choice' must be 'none', 'auto', 'required' or a named function, got {choice!r}",
                            "tool_choice")
        if choice == "required" and not tools:
            raise ToolError("'tool_choice' 'required' needs 'tools'", "tool_choice")
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and \
        isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise ToolError("'tool_choice' must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        "tool_choice")
    if name not in {t["function"]["name"] for t in tools}:
        raise ToolError(f"'tool_choice' names {name!r}, which 'tools' does not declare", "tool_choice.function.name")
    return name


def parameters(tool: Mapping[str, Any]) -> Dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def call_schema(tools: Sequence[Mapping[str, Any]], name: Optional[str] = None) -> Dict[str, Any]:
    """The JSON schema of one call {"name": ..., "parameters": ...}: of the named tool, or of any declared tool."""
    options = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                 "parameters": parameters(t)},
                "required": ["name", "parameters"], "additionalProperties": False}
               for t in tools if name is None or t["function"]["name"] == name]
    return options[0] if len(options) == 1 else {"anyOf": options}


def parse(text: str) -> Tuple[Optional[str], List[ToolCall]]:
    """(content, calls) of an answer, as vLLM's llama3_json parser reads it: calls found means content None."""
    if PYTHON_TAG not in text and "{" not in text:
        return text, []
    start = text.find("{", text.find(PYTHON_TAG) + len(PYTHON_TAG) if PYTHON_TAG in text else 0)
    if start < 0:
        return text, []
    decoder, calls, at = json.JSONDecoder(), [], start
    try:
        while True:
            obj, at = decoder.raw_decode(text, at)
            args = obj.get("parameters", obj.get("arguments")) if isinstance(obj, dict) else None
            if not isinstance(obj.get("name"), str) or not isinstance(args, dict):
                return text, []
            calls.append(ToolCall(obj["name"], json.dumps(args, ensure_ascii=False)))
            rest = text[at:].lstrip()
            if not rest.startswith(";") or "{" not in rest:
                break
            at = text.index("{", at)
    except ValueError:
        return text, []
    return None, calls


def has_tool_messages(messages: Any) -> bool:
    """True when a conversation holds tool results or assistant tool calls (not Meta's plain chat formats')."""
    return isinstance(messages, (list, tuple)) and any(
        isinstance(m, Mapping) and (m.get("role") in TOOL_ROLES or m.get("tool_calls")) for m in messages)


def assistant_message(text: str, tools: Optional[Sequence[Mapping[str, Any]]]) -> Dict[str, Any]:
    """The assistant's message for an answer: its text, or with tools the calls it makes (content None)."""
    if tools:
        content, calls = parse(text)
        if calls:
            return {"role": "assistant", "content": None, "tool_calls": [c.as_openai() for c in calls]}
    return {"role": "assistant", "content": text}


def looks_like_call(text: str) -> Optional[bool]:
    """While streaming: True once an answer starts as a call would, False once it cannot, None while undecided."""
    head = text.lstrip()
    if not head:
        return None
    if head.startswith("{") or head.startswith(PYTHON_TAG):
        return True
    return None if PYTHON_TAG.startswith(head) else False


# --- Meta's Llama 3.1 JSON tool prompt ------------------------------------------------------------------------


def _call_text(call: Mapping[str, Any]) -> str:
    function = call.get("function", {})
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise ToolError(f"an assistant tool call's arguments are not JSON: {arguments[:80]!r}",
                            "messages") from None
    return '{"name": "' + function.get("name", "") + '", "parameters": ' + json.dumps(arguments, ensure_ascii=False) \
        + "}"


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def meta_tool_prompt(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]], date: str,
                     mark=lambda x: x) -> str:
    """The prompt text (special tokens as names) of a conversation with tools in Meta's Llama 3.1 JSON format.
    `mark` marks the caller's strings (templates.SpecialEncoder.mark), so their special-token names stay text."""
    messages, tools = mark([dict(m) for m in messages]), mark(list(tools))
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = (messages[0].get("content") or "").strip(), messages[1:]
    if not messages or messages[0]["role"] != "user":
        raise ToolError("with tools, the conversation must start with a user message (after the system message), "
                        "which the tools are put into", "messages")
    out = ["<|begin_of_text|>", _header("system"), "Environment: ipython\n", "Cutting Knowledge Date: December 2023\n",
           f"Today Date: {date}\n\n", system, "<|eot_id|>", _header("user"), _INSTRUCTION]
    out += [json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in tools]
    out += [(messages[0].get("content") or "").strip(), "<|eot_id|>"]
    for message in messages[1:]:
        if message["role"] in TOOL_ROLES:
            content = message.get("content")
            out += [_header("ipython"), json.dumps(content, ensure_ascii=False), "<|eot_id|>"]
        elif message.get("tool_calls"):
            out += [_header("assistant"), "; ".join(_call_text(c) for c in message["tool_calls"]), "<|eot_id|>"]
        else:
            out += [_header(message["role"]), (message.get("content") or "").strip(), "<|eot_id|>"]
    return "".join(out + [_header("assistant")])


def encode_meta(tokenizer: BaseTokenizer, messages: Sequence[Mapping[str, Any]],
                tools: Sequence[Mapping[str, Any]], date: str, encoder: Any = None) -> List[int]:
    """meta_tool_prompt's token ids (Llama 3 tokenizer); `encoder`: a templates.SpecialEncoder to reuse."""
    from .templates import SpecialEncoder

    encoder = encoder or SpecialEncoder(tokenizer)
    return encoder.encode(meta_tool_prompt(messages, tools, date, encoder.mark))
