"""The SentencePiece tokenizer of Llama 2 (32000 BPE pieces with byte fallback)."""

from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import List, Sequence, Tuple, Union

from sentencepiece import SentencePieceProcessor


class Tokenizer:
    """Text <-> token ids, with the BOS/EOS handling of the released reference."""

    def __init__(self, model_path: Union[str, os.PathLike]) -> None:
        path = Path(model_path)
        if path.is_dir():
            raise FileNotFoundError(f"tokenizer model {str(path)!r} is a directory; give the tokenizer.model file")
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {str(path)!r} does not exist")
        self.path = str(path)
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{str(path)!r} is not a SentencePiece model: {err}") from None
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()  # -1 for Llama 2: it has no pad token
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{str(path)!r} defines no BOS or EOS token; Llama needs both")

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(s).__name__}: {s!r}")
        ids = self.sp_model.encode(s)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, t: Sequence[int]) -> str:
        return self.sp_model.decode([self._check_id(i) for i in t])

    def id_to_piece(self, token: int) -> str:
        return self.sp_model.id_to_piece(self._check_id(token))

    def _check_id(self, token) -> int:
        """An integer id (Python, NumPy or 0-d tensor) inside the vocabulary; anything else is named."""
        try:
            value = operator.index(token)
        except TypeError:
            raise ValueError(f"token id {token!r} is not an integer") from None
        if not 0 <= value < self.n_words:
            raise ValueError(f"token id {value} is outside the vocabulary of {self.n_words} (0..{self.n_words - 1})")
        return value


class TextStream:
    """The text of a growing token sequence, handed out in chunks of whole characters.

    `push(token)` returns the text the token completes ("" when it completes none): bytes of a character split
    over byte-fallback tokens are held back until the character is whole, and SentencePiece's word-boundary
    spaces are kept. `finish()` returns what is still held (an unfinished character as U+FFFD). The chunks join
    to exactly `tokenizer.decode` of all the tokens. Each push decodes only the tokens from the start of the
    previous chunk on (they give the new token its word-boundary context), so a long answer costs O(n), not
    O(n^2). Every streaming path (Llama's streams, the server) uses this one helper.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: List[int] = []
        self._start = 0  # the first token of the last chunk handed out: the decoding window starts here
        self._read = 0  # tokens before this one are in the text handed out

    def push(self, token: int) -> str:
        self.tokens.append(token)
        before, text = self._window()
        if text.endswith("\ufffd") or not text.startswith(before) or len(text) == len(before):
            return ""  # an incomplete UTF-8 character (wait for its remaining bytes), or nothing visible yet
        self._start, self._read = self._read, len(self.tokens)
        return text[len(before):]

    def finish(self) -> str:
        before, text = self._window()
        self._start = self._read = len(self.tokens)
        return text[len(before):] if len(text) > len(before) else ""

    def _window(self) -> Tuple[str, str]:
        """The window's text up to the handed-out point, and with every token so far."""
        window = self.tokens[self._start:]
        return self.tokenizer.decode(window[:self._read - self._start]), self.tokenizer.decode(window)
