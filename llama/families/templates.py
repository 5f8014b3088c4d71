"""Chat templates: a Jinja chat template (a checkpoint's tokenizer_config.json `chat_template`, or a file given
with --chat-template / chat_template=) rendered as transformers' `apply_chat_template` renders it, and encoded
into the token ids vLLM and transformers would send.

Rendering uses the same Jinja setup as transformers: a sandboxed, immutable environment with trim_blocks and
lstrip_blocks, the loopcontrols extension, a `tojson` that does not escape HTML (ensure_ascii off, indent,
separators and sort_keys allowed), and the globals `raise_exception`, `strftime_now`, `dict` and `namespace`.
The variables are the messages, `tools`, `add_generation_prompt`, the tokenizer's special tokens (`bos_token`,
`eos_token`) and any extra keyword (`date_string`, `excluded_category_keys`...). A message's `content: None` is
dropped, as transformers drops None values, and an assistant tool call's `arguments` JSON text is parsed into an
object, as vLLM does, so that templates can `tojson` it.

Encoding: the rendered text is cut at the special tokens the template wrote (<|eot_id|>, <s>...), which become
their ids; the text between is encoded as plain text, without BOS (the template writes its own). Special-token
names inside the caller's strings (messages, tools) stay plain text: they are marked before rendering, as
transformers' `sanitize_control_tokens` does, so no message can forge a header.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..tokenizers import BaseTokenizer

_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters around special-token names the caller typed
JINJA_MARKS = ("{%", "{{")


class TemplateError(ValueError):
    """A template that does not compile, or that refused a conversation (its raise_exception)."""


def _environment():
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("chat templates need jinja2: pip install jinja2") from None

    def raise_exception(message: str):
        raise TemplateError(f"the chat template refused the conversation: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        """A namespace that stores no underscore names (no way to reach Python's internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            values = dict(*args, **kwargs)
            if any(isinstance(k, str) and k.startswith("_") for k in values):
                raise jinja2.exceptions.SecurityError("a namespace cannot hold underscore names")
            jinja2.utils.Namespace.__init__(self, values)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=lambda *a, **k: dict(*a, **k), namespace=Namespace)
    return env


@lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2

    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise TemplateError(f"the chat template does not compile: line {err.lineno}: {err.message}") from None


def load(spec: str) -> Tuple[str, str]:
    """(template text, where it came from) for --chat-template / chat_template=: a file, or the template itself
    when `spec` holds Jinja marks. FileNotFoundError for anything else."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"chat_template must be a file name or a Jinja template, got {spec!r}")
    if any(mark in spec for mark in JINJA_MARKS):
        return spec, "the chat template given"
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"chat template file {spec!r} does not exist (give a .jinja file or the template "
                                "text itself)")
    return path.read_text(encoding="utf-8"), f"chat template {path.name}"


def _mark(value: Any, pattern: "re.Pattern[str]") -> Any:
    """The caller's strings with every special-token name wrapped in the private-use marks (marks they held
    already are dropped, so they cannot forge one)."""
    if isinstance(value, str):
        value = value.replace(_OPEN, "").replace(_CLOSE, "")
        return pattern.sub(lambda m: _OPEN + m.group(0) + _CLOSE, value)
    if isinstance(value, Mapping):
        return {k: _mark(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark(v, pattern) for v in value]
    return value


def template_messages(messages: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Messages as templates see them: None values dropped (transformers), tool-call arguments as objects
    (vLLM)."""
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message["tool_calls"] = [_parsed_call(c) for c in calls]
        out.append(message)
    return out


def _parsed_call(call: Any) -> Any:
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        return call
    function = dict(call["function"])
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except ValueError:
            pass
    return {**call, "function": function}


class SpecialEncoder:
    """Text with special-token names -> ids: the names a prompt writes are their ids, names the caller typed
    (marked with `mark`) and all else plain text, encoded without BOS."""

    def __init__(self, tokenizer: BaseTokenizer, specials: Optional[Mapping[str, int]] = None) -> None:
        self.tokenizer = tokenizer
        self.specials = dict(specials if specials is not None else tokenizer.special_tokens)
        names = sorted(self.specials, key=len, reverse=True)
        self._names = re.compile("|".join(map(re.escape, names)) or "(?!)")
        self._cut = re.compile(f"{_OPEN}({self._names.pattern}){_CLOSE}|[{_OPEN}{_CLOSE}]|({self._names.pattern})")

    def mark(self, value: Any) -> Any:
        """`value` (strings, lists, dicts) with the special-token names in its strings marked as text."""
        return _mark(value, self._names)

    def encode(self, text: str) -> List[int]:
        tokens: List[int] = []
        pending, start = [], 0
        for match in self._cut.finditer(text):
            pending.append(text[start:match.start()])
            start = match.end()
            if match.group(1) is not None:  # a name the caller typed: text
                pending.append(match.group(1))
            elif match.group(2) is not None:  # the prompt's own special token
                tokens += self._plain("".join(pending)) + [self.specials[match.group(2)]]
                pending = []
        pending.append(text[start:])
        return tokens + self._plain("".join(pending))

    def _plain(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, bos=False, eos=False) if text else []


class ChatTemplate:
    """One Jinja chat template bound to a tokenizer (see the module docstring)."""

    def __init__(self, source: str, tokenizer: BaseTokenizer, origin: str = "a chat template",
                 specials: Optional[Mapping[str, int]] = None) -> None:
        self.source, self.origin, self.tokenizer = source, origin, tokenizer
        self.template = _compile(source)
        self.encoder = SpecialEncoder(tokenizer, specials)
        self.variables = {"bos_token": tokenizer.id_to_piece(tokenizer.bos_id),
                          "eos_token": tokenizer.id_to_piece(tokenizer.eos_id)}

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[Mapping[str, Any]]] = None,
               add_generation_prompt: bool = True, mark: bool = False, **kwargs: Any) -> str:
        """The template's text for a conversation (with `mark`, the caller's special-token names marked)."""
        data = {"messages": template_messages(messages), "tools": list(tools) if tools else None, **kwargs}
        if mark:
            data = self.encoder.mark(data)
        try:
            return self.template.render(**{**self.variables, **data, "add_generation_prompt": add_generation_prompt})
        except TemplateError:
            raise
        except Exception as err:  # a template error on these messages: the caller's input, named
            raise TemplateError(f"the chat template failed on these messages: {type(err).__name__}: {err}") from None

    def encode(self, messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[Mapping[str, Any]]] = None,
               add_generation_prompt: bool = True, **kwargs: Any) -> List[int]:
        """The prompt's token ids (see the module docstring)."""
        return self.encoder.encode(self.render(messages, tools, add_generation_prompt, mark=True, **kwargs))
