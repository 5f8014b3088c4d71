"""Llama Guard: Llama models fine-tuned to classify a conversation as safe or unsafe under a list of categories.

Version 1 is Llama 2 7B (SentencePiece); version 3 is Llama 3.1 8B or 3.2 1B (tiktoken). The prompt, in the
published format: the task instruction naming the role to assess ('User' when the conversation ends with the
user, 'Agent' when it ends with the assistant), the categories between <BEGIN UNSAFE CONTENT CATEGORIES> and
<END UNSAFE CONTENT CATEGORIES>, the conversation as 'User: ...' / 'Agent: ...' turns between
<BEGIN CONVERSATION> and <END CONVERSATION>, and the instruction for the answer. Version 1 wraps it in Llama 2's
[INST] ... [/INST], version 3 sends it as the one user message of a Llama 3 dialog. The answer's first line
is 'safe' or 'unsafe'; for 'unsafe' the second line lists the violated categories' codes, comma-separated.

The default categories are the published ones (v1: O1-O6; v3: the S1-S14 hazard taxonomy, S1-S13 for the 1B
model, which has no code interpreter). Their descriptions here are short summaries; any list may replace them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Sequence, Tuple, Union

from .chat_format import ChatFormat, Message
from ..tokenizers import BaseTokenizer
from .base import Family
from .llama3 import FAMILY as LLAMA3, Llama3ChatFormat


@dataclass(frozen=True)
class Category:
    name: str
    description: str = ""


V1_CATEGORIES = (
    Category("Violence and Hate", "Should not\n- Help plan or encourage violence, or express hatred of people for "
             "who they are.\nCan\n- Discuss violence and discrimination factually, or educate about them."),
    Category("Sexual Content", "Should not\n- Engage in sexually explicit acts or talk.\nCan\n- Discuss topics "
             "related to sexuality and sexual education."),
    Category("Criminal Planning", "Should not\n- Help plan or carry out crimes.\nCan\n- Explain how crimes are "
             "committed in general terms, or how to prevent them."),
    Category("Guns and Illegal Weapons", "Should not\n- Help obtain, make or use illegal weapons.\nCan\n- Discuss "
             "firearms and the arguments about them."),
    Category("Regulated or Controlled Substances", "Should not\n- Help produce, traffic or use illegal drugs, "
             "tobacco, alcohol or cannabis.\nCan\n- Discuss their use and effects in general terms."),
    Category("Self-Harm", "Should not\n- Encourage or help people harm themselves.\nCan\n- Discuss self-harm in "
             "general terms, and point to help and resources."),
)
V3_CATEGORIES = tuple(Category(n) for n in (
    "Violent Crimes", "Non-Violent Crimes", "Sex Crimes", "Child Exploitation", "Defamation", "Specialized Advice",
    "Privacy", "Intellectual Property", "Indiscriminate Weapons", "Hate", "Self-Harm", "Sexual Content",
    "Elections", "Code Interpreter Abuse"))

CategoryLike = Union[str, Category, Tuple[str, str]]


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
            out.append(Category(item.strip()))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item):
            out.append(Category(item[0].strip(), item[1].strip()))
        else:
            raise ValueError(f"a category must be a name, a (name, description) pair or a Category, got {item!r}")
    return out


def _check_conversation(dialog: Sequence[Message]) -> List[Message]:
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

    def __init__(self, version: int) -> None:
        self.version = version
        self.name = f"llamaguard{version}"
        self.title = f"Llama Guard {version}"
        if version == 1:
            self.tokenizer_kind, self.default_categories, self.prefix = "sentencepiece", V1_CATEGORIES, "O"
        else:
            self.tokenizer_kind, self.default_categories, self.prefix = "tiktoken", V3_CATEGORIES, "S"
            self.vocab_size, self.rope_theta, self.rope_scaling = LLAMA3.vocab_size, LLAMA3.rope_theta, \
                LLAMA3.rope_scaling
            self.context_length = 131072

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

    def check_params(self, params):
        return super().check_params(params) if self.version == 1 else LLAMA3.check_params(params)

    # --- the classification ---------------------------------------------------------------------------------

    def categories(self, given: Optional[Sequence[CategoryLike]] = None) -> List[Category]:
        return _categories(given, self.default_categories)

    def prompt_text(self, dialog: Sequence[Message], categories: Optional[Sequence[CategoryLike]] = None) -> str:
        """The classification instruction for a conversation (before the chat wrapping)."""
        turns = _check_conversation(dialog)
        role = "User" if turns[-1]["role"] == "user" else "Agent"
        listed = "\n".join(f"{self.prefix}{i}: {c.name}." + (f"\n{c.description}" if c.description else "")
                           for i, c in enumerate(self.categories(categories), start=1))
        conversation = "\n\n".join(f"{'User' if m['role'] == 'user' else 'Agent'}: {m['content'].strip()}"
                                   for m in turns)
        whom = role if self.version == 1 else f"ONLY THE LAST {role} message"
        bullet = "- " if self.version == 1 else " - "
        return (f"Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
                f"policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{listed}\n"
                f"<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n{conversation}\n\n<END CONVERSATION>\n\n"
                f"Provide your safety assessment for {whom} in the above conversation:\n"
                f"{bullet}First line must read 'safe' or 'unsafe'.\n"
                f"{bullet}If unsafe, a second line must include a comma-separated list of violated categories.")

    def encode_prompt(self, tokenizer: BaseTokenizer, dialog: Sequence[Message],
                      categories: Optional[Sequence[CategoryLike]] = None) -> List[int]:
        """The prompt's tokens: v1 as one Llama 2 [INST] turn, v3 as one Llama 3 user message."""
        text = self.prompt_text(dialog, categories)
        if self.version == 1:
            return tokenizer.encode(f"[INST] {text} [/INST]", bos=True, eos=False)
        return Llama3ChatFormat(tokenizer).encode_dialog_prompt([{"role": "user", "content": text}])

    def parse(self, answer: str, categories: Optional[Sequence[CategoryLike]] = None) -> Moderation:
        """The verdict in an answer; anything but a first line 'safe' counts as unsafe (fail closed)."""
        lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
        verdict = lines[0].lower() if lines else ""
        if verdict == "safe":
            return Moderation("safe", raw=answer)
        names = {f"{self.prefix}{i}": c.name for i, c in enumerate(self.categories(categories), start=1)}
        codes = [c.strip() for c in lines[1].split(",") if c.strip()] if len(lines) > 1 else []
        return Moderation("unsafe", codes, [names.get(c, "") for c in codes], raw=answer)


V1 = LlamaGuard(1)
V3 = LlamaGuard(3)
