"""The one small interface every tokenizer of the family offers, and what its two kinds share."""

from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Union

PathLike = Union[str, os.PathLike]


def check_model_file(model_path: PathLike) -> Path:
    """The tokenizer file as a Path; a clear error for a missing file or a directory."""
    path = Path(model_path)
    if path.is_dir():
        raise FileNotFoundError(f"tokenizer model {str(path)!r} is a directory; give the tokenizer.model file")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model {str(path)!r} does not exist")
    return path


class BaseTokenizer:
    """Text <-> token ids with the released references' BOS/EOS handling.

    Every tokenizer has: `path`, `n_words` (vocabulary size, special tokens included), `bos_id`, `eos_id`,
    `pad_id` (-1: none), `special_tokens` (name -> id of the tokens that text never encodes to), and the methods
    below. `kind` names the file format ('sentencepiece' or 'tiktoken')."""

    kind: str = ""
    path: str
    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int = -1
    special_tokens: Dict[str, int]
    # Each kind's own library calls, set by its __init__; `encode` and `decode` add what every kind shares.
    _encode_text: Callable[[str], List[int]]  # a text's ids alone (no BOS, no EOS), special-token names as text
    _decode_ids: Callable[[List[int]], str]  # the text of ids already checked against the vocabulary

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """The ids of `s`, with BOS before and EOS after when asked. Special-token names in `s` are plain text."""
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(s).__name__}: {s!r}")
        return [self.bos_id] * bos + self._encode_text(s) + [self.eos_id] * eos

    def decode(self, t: Sequence[int]) -> str:
        """The text of ids; a character whose bytes are incomplete decodes to U+FFFD."""
        return self._decode_ids([self._check_id(i) for i in t])

    def id_to_piece(self, token: int) -> str:
        """The vocabulary's own spelling of a token."""
        raise NotImplementedError

    def token_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes a token stands for in a text (a word-boundary marker as a space; a special token as
        its name)."""
        raise NotImplementedError

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece (a special token's name included), or -1 where the vocabulary has none."""
        raise NotImplementedError

    def _check_id(self, token) -> int:
        """An integer id (Python, NumPy or 0-d tensor) inside the vocabulary; anything else is named."""
        try:
            value = operator.index(token)
        except TypeError:
            raise ValueError(f"token id {token!r} is not an integer") from None
        if not 0 <= value < self.n_words:
            raise ValueError(f"token id {value} is outside the vocabulary of {self.n_words} (0..{self.n_words - 1})")
        return value
