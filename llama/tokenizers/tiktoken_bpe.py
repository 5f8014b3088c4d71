"""Llama 3's tokenizer: tiktoken over the base64 rank file of Meta's release, plus 256 special tokens.

The file holds one line per token, `base64(bytes) rank`, 128000 lines; the special tokens follow at ids
128000-128255, with the names of Llama 3.1 and later (3.0 called some of them reserved; the ids that mean
anything are the same). Text is split with Llama 3's pattern before byte-pair merging. Special-token names
inside a text are encoded as plain text, as Meta's reference does, so a message cannot forge a header.
"""

from __future__ import annotations

import base64
import binascii
from typing import Dict, List

from .base import BaseTokenizer, PathLike, check_model_file

# The pre-tokenizer split of Llama 3 (the same as GPT-4's cl100k): contractions, letters with one leading
# non-letter, numbers in groups of up to 3 digits, punctuation runs, newlines, other whitespace.
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL = 256
NAMED_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
def special_token_names() -> List[str]:
    """The 256 names, in id order from 128000."""
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + NUM_SPECIAL - len(NAMED_SPECIAL))]
    return NAMED_SPECIAL + reserved


def read_ranks(path: str) -> Dict[bytes, int]:
    """token bytes -> rank from a tiktoken file; errors name the file and the line."""
    ranks: Dict[bytes, int] = {}
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected 'base64 rank'")
                ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
            except (ValueError, binascii.Error) as err:
                raise ValueError(f"{path!r} is not a tiktoken vocabulary: line {number}: {err}") from None
    if not ranks:
        raise ValueError(f"{path!r} is an empty tiktoken vocabulary")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path!r}: the ranks of a tiktoken vocabulary must be 0..{len(ranks) - 1}, each once")
    return ranks


class TiktokenTokenizer(BaseTokenizer):
    kind = "tiktoken"

    def __init__(self, model_path: PathLike) -> None:
        import tiktoken

        path = check_model_file(model_path)
        self.path = str(path)
        ranks = read_ranks(self.path)
        base = len(ranks)
        self.special_tokens: Dict[str, int] = {name: base + i for i, name in enumerate(special_token_names())}
        self.model = tiktoken.Encoding(name=path.name, pat_str=PATTERN, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.n_words: int = self.model.n_vocab
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int = -1
        self._names = {i: name for name, i in self.special_tokens.items()}
        # Meta's reference cuts long texts and long runs of (non-)whitespace into pieces first, against stack
        # overflows of older tiktoken releases; a cut inside a run can change the tokens there. Recent tiktoken
        # encodes such runs whole, so this encodes exactly as tiktoken does.
        self._encode_text, self._decode_ids = self.model.encode_ordinary, self.model.decode

    def token_bytes(self, token: int) -> bytes:
        return self.model.decode_single_token_bytes(self._check_id(token))

    def id_to_piece(self, token: int) -> str:
        token = self._check_id(token)
        if token in self._names:
            return self._names[token]
        return self.token_bytes(token).decode("utf-8", errors="replace")

    def piece_to_id(self, piece: str) -> int:
        if piece in self.special_tokens:
            return self.special_tokens[piece]
        try:
            return self.model.encode_single_token(piece.encode("utf-8"))
        except KeyError:
            return -1
