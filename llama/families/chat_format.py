"""The Llama 2 chat prompt: ``[INST]`` turns, a ``<<SYS>>`` block, one BOS/EOS pair per exchange.

Also Code Llama Instruct's and Llama Guard 1's. The dialog types and their validation are shared by every chat
format of the family (Llama 3's is in llama/families/llama3.py).
"""

from __future__ import annotations

from typing import List, Literal, Optional, Sequence, TypedDict

from ..tokenizers import BaseTokenizer

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = List[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def validate_dialog(dialog: Sequence[Message], index: Optional[int] = None) -> None:
    """Optional system message, then user/assistant alternating, ending with user; else a ValueError saying where."""
    where = "dialog" if index is None else f"dialog {index}"
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError(f"{where} must be a non-empty list of messages, got {dialog!r}")
    for pos, msg in enumerate(dialog):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise ValueError(f"{where}, message {pos}: expected {{'role': str, 'content': str}}, got {msg!r}")
    start = 1 if dialog[0]["role"] == "system" else 0
    for pos in range(start, len(dialog)):
        expected = "user" if (pos - start) % 2 == 0 else "assistant"
        if dialog[pos]["role"] != expected:
            raise ValueError(f"{where}, message {pos}: role {dialog[pos]['role']!r} where {expected!r} was expected "
                             "(roles go: optional 'system', then 'user' and 'assistant' alternating)")
    if dialog[-1]["role"] != "user":
        raise ValueError(f"{where} must end with a 'user' message, but message {len(dialog) - 1} is "
                         f"{dialog[-1]['role']!r}")


def contains_tags(text: str) -> bool:
    """True when a text holds the prompt's own tags ([INST], [/INST], <<SYS>>, <</SYS>>)."""
    return any(tag in text for tag in SPECIAL_TAGS)


def has_special_tags(dialog: Sequence[Message]) -> bool:
    """True when a message smuggles in the prompt's own tags (a prompt injection)."""
    return any(contains_tags(msg["content"]) for msg in dialog)


class ChatFormat:
    """Dialog -> prompt tokens. Every family's chat format offers these methods: `tags` (the prompt's own
    markers, which a message may not contain, as text) and the checks for them."""

    tags: Sequence[str] = tuple(SPECIAL_TAGS)

    def __init__(self, tokenizer: BaseTokenizer) -> None:
        self.tokenizer = tokenizer

    def contains_tags(self, text: str) -> bool:
        """True when a text holds one of this format's markers."""
        return any(tag in text for tag in self.tags)

    def has_special_tags(self, dialog: Sequence[Message]) -> bool:
        """True when a message smuggles in this format's markers (a prompt injection)."""
        return any(self.contains_tags(msg["content"]) for msg in dialog)

    def tags_text(self) -> str:
        """The markers, for messages: "[INST], [/INST], <<SYS>> and <</SYS>>"."""
        return ", ".join(self.tags[:-1]) + f" and {self.tags[-1]}" if len(self.tags) > 1 else "".join(self.tags)

    def encode_dialog_prompt(self, dialog: Sequence[Message]) -> List[int]:
        """The exact prompt tokens of a dialog: BOS [INST] user [/INST] answer EOS ... BOS [INST] user [/INST]."""
        validate_dialog(dialog)
        turns = [m["content"] for m in dialog]
        if dialog[0]["role"] == "system":  # joined first, then stripped as one text (Meta's chat_completion)
            turns = [f"{B_SYS}{turns[0]}{E_SYS}{turns[1]}"] + turns[2:]
        turns = [t.strip() for t in turns]
        tokens: List[int] = []
        for user, answer in zip(turns[0::2], turns[1::2]):
            tokens += self.tokenizer.encode(f"{B_INST} {user} {E_INST} {answer} ", bos=True, eos=True)
        tokens += self.tokenizer.encode(f"{B_INST} {turns[-1]} {E_INST}", bos=True, eos=False)
        return tokens
