"""Code Llama: Llama 2 trained on code, with rope_theta 1e6 for 16k contexts and (7B, 13B, 70B) fill-in-the-
middle through four extra pieces of its 32016-token vocabulary. Code Llama Instruct chats in Llama 2's format.

Infilling, as Meta's codellama repository does it (prefix-suffix-middle, "PSM"): BOS ▁<PRE> prefix ▁<SUF>
suffix ▁<MID>, and the model writes the middle until ▁<EOT>. The suffix is encoded without SentencePiece's
leading word-boundary space (it continues text), and so is the middle when decoded.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from ..tokenizers import BaseTokenizer
from .base import Family

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
        ids = infill_ids(tokenizer)
        return (tokenizer.eos_id,) + ((ids[3],) if ids is not None else ())

    def hf_eos_ids(self, tokenizer: BaseTokenizer) -> List[int]:
        return [tokenizer.eos_id]

    def matches(self, params, tokenizer: BaseTokenizer) -> bool:
        """Code Llama's rope_theta, or the infilling pieces in the vocabulary."""
        return super().matches(params, tokenizer) and (
            params.get("rope_theta") == ROPE_THETA or infill_ids(tokenizer) is not None)


FAMILY = CodeLlama()
