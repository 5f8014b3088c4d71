"""Code Llama: Llama 2 trained on code, with rope_theta 1e6 for 16k contexts and (7B, 13B, 70B) fill-in-the-
middle through four extra pieces of its 32016-token vocabulary. Code Llama Instruct 7B-34B chats in Llama 2's
format; 70B Instruct in its own (CodeLlama70BChatFormat): BOS, then per message "Source: ROLE\n\n CONTENT" and
the <step> token, then "Source: assistant\nDestination: user\n\n ", which the answer follows.

Stop tokens as Meta's codellama generation: a chat or completion ends at EOS only (70B Instruct: EOS or <step>),
an infilling only at ▁<EOT> (`infill_stop_ids`).

Infilling, as Meta's codellama repository does it (prefix-suffix-middle, "PSM"): BOS ▁<PRE> prefix ▁<SUF>
suffix ▁<MID>, and the model writes the middle until ▁<EOT>. The suffix is encoded without SentencePiece's
leading word-boundary space (it continues text), and so is the middle when decoded.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from .chat_format import ChatFormat, Message, validate_dialog
from ..tokenizers import BaseTokenizer
from .base import Family

STEP = "<step>"  # 70B Instruct's turn separator, id 32015
PREFIX, SUFFIX, MIDDLE, EOT = "\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>", "\u2581<EOT>"
INFILL_IDS = {PREFIX: 32007, SUFFIX: 32008, MIDDLE: 32009, EOT: 32010}  # in the released 32016-token vocabulary
ROPE_THETA = 1_000_000.0
_ANCHOR = "\u263a"  # a character with a piece of its own, put before a text so that no "▁" is added to the text


def infill_ids(tokenizer: BaseTokenizer) -> Optional[Tuple[int, int, int, int]]:
    """(prefix, suffix, middle, eot) ids, or None where the vocabulary has no infilling pieces."""
    ids = tuple(tokenizer.piece_to_id(p) for p in (PREFIX, SUFFIX, MIDDLE, EOT))
    return None if min(ids) < 0 else ids


def _encode_continuation(tokenizer: BaseTokenizer, text: str) -> List[int]:
    """`text` encoded as the continuation of other text: no word-boundary "▁" added in front."""
    anchor = tokenizer.encode(_ANCHOR, bos=False, eos=False)
    ids = tokenizer.encode(_ANCHOR + text, bos=False, eos=False)
    return ids[len(anchor):]


def infilling_prompt(tokenizer: BaseTokenizer, prefix: str, suffix: str, suffix_first: bool = False) -> List[int]:
    """The prompt tokens of a fill-in-the-middle request (PSM, or SPM with suffix_first)."""
    ids = infill_ids(tokenizer)
    if ids is None:
        raise ValueError(f"tokenizer {tokenizer.path!r} has no infilling pieces ({PREFIX}, {SUFFIX}, {MIDDLE}, "
                         f"{EOT}): only Code Llama 7B, 13B and 70B (base and Python) fill in the middle")
    pre, suf, mid, _ = ids
    if suffix_first:
        return [tokenizer.bos_id, pre, suf] + _encode_continuation(tokenizer, suffix) + [mid] + \
            tokenizer.encode(prefix, bos=False, eos=False)
    return [tokenizer.bos_id, pre] + tokenizer.encode(prefix, bos=False, eos=False) + [suf] + \
        _encode_continuation(tokenizer, suffix) + [mid]


def decode_infill(tokenizer: BaseTokenizer, tokens: List[int]) -> str:
    """The middle's text: its first token's "▁" is a real space (the middle continues the prefix)."""
    anchor = tokenizer.encode(_ANCHOR, bos=False, eos=False)
    return tokenizer.decode(anchor + list(tokens))[len(tokenizer.decode(anchor)):]


class CodeLlama70BChatFormat(ChatFormat):
    """Code Llama 70B Instruct's dialogs, as its model card writes them out (ids included): each message
    "Source: ROLE\n\n CONTENT" (content stripped, encoded with SentencePiece's leading space) then <step>; a dialog
    without a system message gets an empty one first, as Meta's codellama code does."""

    tags: Sequence[str] = (STEP, "Source: ", "Destination: ")

    def encode_dialog_prompt(self, dialog: Sequence[Message]) -> List[int]:
        validate_dialog(dialog)
        step = self.tokenizer.piece_to_id(STEP)
        if step < 0:
            raise ValueError(f"tokenizer {self.tokenizer.path!r} has no {STEP} piece: the Code Llama 70B Instruct "
                             "format needs 70B Instruct's vocabulary")
        if dialog[0]["role"] != "system":
            dialog = [{"role": "system", "content": ""}] + list(dialog)
        tokens = [self.tokenizer.bos_id]
        for message in dialog:
            text = f"Source: {message['role']}\n\n {message['content'].strip()}"
            tokens += self.tokenizer.encode(text, bos=False, eos=False) + [step]
        return tokens + self.tokenizer.encode("Source: assistant\nDestination: user\n\n ", bos=False, eos=False)


class CodeLlama(Family):
    name = "codellama"
    title = "Code Llama"
    vocab_size = 32016
    context_length = 16384
    rope_theta = ROPE_THETA
    temperature = 0.2  # the codellama examples' defaults
    top_p = 0.95
    infilling = True

    def stop_ids(self, tokenizer: BaseTokenizer) -> Tuple[int, ...]:
        return (tokenizer.eos_id,)

    def infill_stop_ids(self, tokenizer: BaseTokenizer) -> Tuple[int, ...]:
        """An infilling ends at ▁<EOT> only (EOS does not end it)."""
        ids = infill_ids(tokenizer)
        return (ids[3],) if ids is not None else (tokenizer.eos_id,)

    def hf_eos_ids(self, tokenizer: BaseTokenizer) -> List[int]:
        return [tokenizer.eos_id]

    def matches(self, params, tokenizer: BaseTokenizer) -> bool:
        """Code Llama's rope_theta, or the infilling pieces in the vocabulary."""
        return super().matches(params, tokenizer) and (
            params.get("rope_theta") == ROPE_THETA or infill_ids(tokenizer) is not None)


class CodeLlama70B(CodeLlama):
    """Code Llama 70B (width 8192): 70B Instruct's chat format and its <step> stop token."""

    name = "codellama-70b"
    title = "Code Llama 70B"

    def chat_format(self, tokenizer: BaseTokenizer) -> ChatFormat:
        return CodeLlama70BChatFormat(tokenizer)

    def stop_ids(self, tokenizer: BaseTokenizer) -> Tuple[int, ...]:
        step = tokenizer.piece_to_id(STEP)
        return (tokenizer.eos_id,) + ((step,) if step >= 0 else ())

    def matches(self, params, tokenizer: BaseTokenizer) -> bool:
        return super().matches(params, tokenizer) and params.get("dim") == 8192


FAMILY = CodeLlama()
FAMILY_70B = CodeLlama70B()
