"""A generator's chat prompts: which format it uses and the prompt tokens of a conversation (with tools).

The format is a chat template when there is one (given with chat_template= / --chat-template, or a Hugging Face
checkpoint's own), rendered as transformers renders it (templates.py); otherwise the family's Meta format: its
ChatFormat, Meta's Llama 3.1 JSON tool format when there are tools (tools.py), and for Llama Guard the moderation
prompt of the conversation (llamaguard.py), which may end with the assistant's answer (`excluded_category_keys`,
the Llama Guard 3 1B template's variable, leaves categories out).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .chat_format import validate_dialog
from ..tokenizers import BaseTokenizer
from .base import Family
from .templates import ChatTemplate, SpecialEncoder
from .tools import TOOL_ROLES, ToolError, encode_meta

ROLES = ("system", "user", "assistant") + TOOL_ROLES


def check_messages(messages: Any) -> List[Dict[str, Any]]:
    """OpenAI-shaped messages checked (ToolError naming messages[i].field): a role, string content (None only
    for an assistant message with tool_calls), tool calls with a function name."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ToolError("messages must be a non-empty list of messages", "messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping) or message.get("role") not in ROLES:
            raise ToolError(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
        calls = message.get("tool_calls")
        if calls is not None:
            if message["role"] != "assistant" or not isinstance(calls, list) or not calls or not all(
                    isinstance(c, Mapping) and isinstance(c.get("function"), Mapping) and
                    isinstance(c["function"].get("name"), str) for c in calls):
                raise ToolError(f"{where}.tool_calls must be a non-empty list of {{\"function\": {{\"name\", "
                                "\"arguments\"}}} on an assistant message", f"{where}.tool_calls")
        content = message.get("content")
        if not isinstance(content, str) and not (content is None and calls):
            raise ToolError(f"{where}.content must be a string", f"{where}.content")
    return [dict(m) for m in messages]


def _plain(messages: Sequence[Mapping[str, Any]]) -> bool:
    return all(m["role"] in ("system", "user", "assistant") and not m.get("tool_calls") for m in messages)


class ChatPrompts:
    """The chat prompts of one generator (see the module docstring)."""

    def __init__(self, family: Family, tokenizer: BaseTokenizer, template: Optional[ChatTemplate] = None) -> None:
        self.family, self.tokenizer, self.template = family, tokenizer, template
        self.formatter = family.chat_format(tokenizer)
        self._encoder: Optional[SpecialEncoder] = None  # Meta's tool prompt's, made at its first use

    def describe(self) -> str:
        """Which format, for the start-up line and /v1/models."""
        if self.template is not None:
            return f"chat template ({self.template.origin})"
        return f"Meta's {self.family.title} format"

    @property
    def checks_tags(self) -> bool:
        """Meta's formats refuse messages holding their tags ([INST], <<SYS>>); a template does not."""
        return self.template is None and not self.family.moderation

    def encode(self, messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[Mapping[str, Any]]] = None,
               **template_kwargs: Any) -> List[int]:
        """The prompt tokens the answer follows. ValueError (ToolError, TemplateError) naming what is wrong."""
        messages = check_messages(messages)
        if self.template is not None:
            return self.template.encode(messages, tools, **template_kwargs)
        if self.family.moderation:
            if not _plain(messages):
                raise ToolError("Llama Guard rates user and assistant messages, not tool calls", "messages")
            excluded = template_kwargs.get("excluded_category_keys") or ()  # the 1B template's name for it
            return self.family.encode_prompt(self.tokenizer, messages, None, excluded)
        if tools or not _plain(messages):
            if self.family.tokenizer_kind != "tiktoken":
                raise ToolError(f"tool calling needs Llama 3.1 or later (or a chat template that renders tools); "
                                f"this is {self.family.title}", "tools" if tools else "messages")
            date = template_kwargs.get("date_string") or datetime.now().strftime("%d %b %Y")
            if self._encoder is None:
                self._encoder = SpecialEncoder(self.tokenizer)
            return encode_meta(self.tokenizer, messages, tools or [], date, self._encoder)
        try:
            validate_dialog(messages)
        except ValueError as err:
            raise ToolError(str(err).replace("dialog, ", ""), "messages") from None
        return self.formatter.encode_dialog_prompt(messages)
