"""Llama Guard: Llama models fine-tuned to classify a conversation as safe or unsafe under a list of categories.

Versions: 1 (LlamaGuard-7b, Llama 2 7B, SentencePiece), 2 (Meta-Llama-Guard-2-8B, Llama 3 8B), 3 (Llama-Guard-3-8B
on Llama 3.1 8B, and Llama-Guard-3-1B on Llama 3.2 1B). The prompt, as Meta published it: the task naming the role
to assess ('User' when the conversation has an odd number of turns, 'Agent' when it ends with the assistant's
answer), the categories between <BEGIN UNSAFE CONTENT CATEGORIES> and <END UNSAFE CONTENT CATEGORIES>, the turns
as 'User: ...' / 'Agent: ...' between <BEGIN CONVERSATION> and <END CONVERSATION>, and the instruction for the
answer. Versions 1 and 2 wrap it in [INST] ... [/INST] after BOS; version 3 sends it as the one user message of a
Llama 3 dialog. The answer's first line is 'safe' or 'unsafe'; for 'unsafe' the second line lists the violated
categories' codes, comma-separated.

The default categories are the published ones, verbatim (guard_categories.py): v1 O1-O6 with their policies,
v2 S1-S11, v3 8B S1-S14, v3 1B S1-S13. Any list may replace them; `excluded` leaves categories out by code and
keeps the codes of the rest, as the Llama Guard 3 1B template's excluded_category_keys does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

from .chat_format import ChatFormat, Message
from ..tokenizers import BaseTokenizer
from . import guard_categories as published
from .base import Family
from .llama3 import FAMILY as LLAMA3, Llama3ChatFormat


@dataclass(frozen=True)
class Category:
    """One category. `name` is written as the prompt shows it (a full stop is added where it has none); the
    description, when there is one, follows on the next lines."""

    name: str
    description: str = ""

    @property
    def heading(self) -> str:
        return self.name if self.name.rstrip().endswith(".") else self.name + "."

    @property
    def title(self) -> str:
        """The name for people: no full stop, no padding."""
        return self.name.strip().rstrip(".").strip()


CategoryLike = Union[str, Category, Tuple[str, str]]
V1_CATEGORIES = tuple(Category(n, d) for n, d in published.V1)
V2_CATEGORIES = tuple(Category(n) for n in published.V2)
V3_CATEGORIES = tuple(Category(n) for n in published.V3)
V3_1B_CATEGORIES = tuple(Category(n) for n in published.V3_1B)


@dataclass
class Moderation:
    """A guard's verdict: 'safe' or 'unsafe', the violated categories' codes (O1, S10...) and names."""

    verdict: str
    categories: List[str] = field(default_factory=list)
    names: List[str] = field(default_factory=list)
    raw: str = ""  # the model's answer as it came

    @property
    def safe(self) -> bool:
        return self.verdict == "safe"

    def describe(self) -> str:
        if self.safe:
            return "safe"
        listed = ", ".join(f"{c} ({n})" if n else c for c, n in zip(self.categories, self.names))
        return f"unsafe: {listed}" if listed else "unsafe"


def _categories(given: Optional[Sequence[CategoryLike]], default: Sequence[Category]) -> List[Category]:
    if given is None:
        return list(default)
    if isinstance(given, str) or not given:
        raise ValueError(f"categories must be a non-empty list of names, (name, description) pairs or Category, "
                         f"got {given!r}")
    out = []
    for item in given:
        if isinstance(item, Category):
            out.append(item)
        elif isinstance(item, str) and item.strip():
            out.append(Category(item))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item) \
                and item[0].strip():
            out.append(Category(item[0], item[1]))
        else:
            raise ValueError(f"a category must be a name, a (name, description) pair or a Category, got {item!r}")
    return out


def check_conversation(dialog: Sequence[Message]) -> List[Message]:
    """user, assistant, user... (a system message is not assessed and is left out); ends with either role."""
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError(f"the conversation to moderate must be a non-empty list of messages, got {dialog!r}")
    for pos, msg in enumerate(dialog):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise ValueError(f"message {pos}: expected {{'role': str, 'content': str}}, got {msg!r}")
    turns = [m for m in dialog if m["role"] != "system"]
    for pos, msg in enumerate(turns):
        expected = "user" if pos % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise ValueError(f"conversation turn {pos}: role {msg['role']!r} where {expected!r} was expected "
                             "(user and assistant alternate, starting with user)")
    if not turns:
        raise ValueError("the conversation to moderate has no user message")
    return turns


class LlamaGuard(Family):
    """Llama Guard of one version; its base family gives the tokenizer, RoPE and stop tokens."""

    chat = False
    moderation = True

    def __init__(self, version: int, small: bool = False) -> None:
        self.version, self.small = version, small
        self.name = f"llamaguard{version}" + ("-1b" if small else "")
        self.title = f"Llama Guard {version}" + (" 1B" if small else "")
        self.prefix = "O" if version == 1 else "S"
        self.default_categories = {1: V1_CATEGORIES, 2: V2_CATEGORIES,
                                   3: V3_1B_CATEGORIES if small else V3_CATEGORIES}[version]
        if version > 1:
            self.tokenizer_kind, self.vocab_size, self.rope_theta = "tiktoken", LLAMA3.vocab_size, LLAMA3.rope_theta
            self.rope_scaling = LLAMA3.rope_scaling
            self.context_length = 8192 if version == 2 else 131072

    def matches(self, params, tokenizer) -> bool:
        return False  # a guard's files look like its base model's: it is chosen by name (family=, --shield)

    def chat_format(self, tokenizer: BaseTokenizer) -> ChatFormat:
        return ChatFormat(tokenizer) if self.version == 1 else Llama3ChatFormat(tokenizer)

    def stop_ids(self, tokenizer: BaseTokenizer) -> Tuple[int, ...]:
        return (tokenizer.eos_id,) if self.version == 1 else LLAMA3.stop_ids(tokenizer)

    def hf_eos_ids(self, tokenizer: BaseTokenizer) -> List[int]:
        return [tokenizer.eos_id] if self.version == 1 else LLAMA3.hf_eos_ids(tokenizer)

    def hf_tokenizer_files(self, tokenizer: BaseTokenizer, max_position_embeddings: int):
        base = super() if self.version == 1 else LLAMA3
        return base.hf_tokenizer_files(tokenizer, max_position_embeddings)

    def check_params(self, params: Mapping[str, Any]):
        return super().check_params(params) if self.version == 1 else LLAMA3.check_params(params)

    # --- the classification ---------------------------------------------------------------------------------

    def categories(self, given: Optional[Sequence[CategoryLike]] = None,
                   excluded: Sequence[str] = ()) -> List[Tuple[str, Category]]:
        """(code, category) of the categories the prompt lists: O1.../S1... by position, less `excluded` codes."""
        coded = [(f"{self.prefix}{i}", c) for i, c in enumerate(_categories(given, self.default_categories), 1)]
        if isinstance(excluded, str) or not all(isinstance(code, str) for code in excluded):
            raise ValueError(f"excluded must be a list of category codes, got {excluded!r}")
        unknown = [code for code in excluded if code not in {k for k, _ in coded}]
        if unknown:
            raise ValueError(f"excluded category {unknown[0]!r} is not one of {[k for k, _ in coded]}")
        kept = [(k, c) for k, c in coded if k not in excluded]
        if not kept:
            raise ValueError("excluded leaves no category to check")
        return kept

    def prompt_text(self, dialog: Sequence[Message], categories: Optional[Sequence[CategoryLike]] = None,
                    excluded: Sequence[str] = ()) -> str:
        """The classification instruction for a conversation (before the chat wrapping)."""
        turns = check_conversation(dialog)
        role = "User" if len(turns) % 2 else "Agent"
        listed = "\n".join(f"{code}: {c.heading}" + (f"\n{c.description}" if c.description else "")
                           for code, c in self.categories(categories, excluded))
        conversation = "".join(f"{'User' if m['role'] == 'user' else 'Agent'}: {m['content'].strip()}\n\n"
                               for m in turns)
        whom = role if self.version == 1 else f"ONLY THE LAST {role} message"
        bullet = "- " if self.version == 1 else " - "
        return (f"Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
                f"policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{listed}\n"
                f"<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n{conversation}<END CONVERSATION>\n\n"
                f"Provide your safety assessment for {whom} in the above conversation:\n"
                f"{bullet}First line must read 'safe' or 'unsafe'.\n"
                f"{bullet}If unsafe, a second line must include a comma-separated list of violated categories.")

    def encode_prompt(self, tokenizer: BaseTokenizer, dialog: Sequence[Message],
                      categories: Optional[Sequence[CategoryLike]] = None, excluded: Sequence[str] = ()) -> List[int]:
        """The prompt's tokens: v1 and v2 as BOS [INST] ... [/INST], v3 as one Llama 3 user message."""
        text = self.prompt_text(dialog, categories, excluded)
        if self.version < 3:
            return tokenizer.encode(f"[INST] {text} [/INST]", bos=True, eos=False)
        return Llama3ChatFormat(tokenizer).encode_dialog_prompt([{"role": "user", "content": text}])

    def parse(self, answer: str, categories: Optional[Sequence[CategoryLike]] = None) -> Moderation:
        """The verdict in an answer; anything but a first line 'safe' counts as unsafe (fail closed)."""
        lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
        verdict = lines[0].lower() if lines else ""
        if verdict == "safe":
            return Moderation("safe", raw=answer)
        names = {code: c.title for code, c in self.categories(categories)}
        codes = [c.strip() for c in lines[1].split(",") if c.strip()] if len(lines) > 1 else []
        return Moderation("unsafe", codes, [names.get(c, "") for c in codes], raw=answer)


V1 = LlamaGuard(1)
V2 = LlamaGuard(2)
V3 = LlamaGuard(3)
V3_1B = LlamaGuard(3, small=True)


def version_for(tokenizer: Optional[BaseTokenizer], params: Optional[Mapping[str, Any]] = None) -> LlamaGuard:
    """'llamaguard' without a version: 1 on a SentencePiece tokenizer; on tiktoken 2 without Llama 3.1's scaled
    RoPE (Llama 3 8B), else 3, the 1B model where the width is Llama 3.2 1B's (2048)."""
    params = params or {}
    if tokenizer is None or tokenizer.kind != "tiktoken":
        return V1
    if params and not params.get("use_scaled_rope"):
        return V2
    return V3_1B if params.get("dim") == 2048 else V3
