"""The SentencePiece tokenizer of Llama 2 (32000 BPE pieces with byte fallback)."""

from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

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

    def byte_value(self, token: int) -> Optional[int]:
        """The byte a byte-fallback token (`<0xNN>`) stands for; None for any other token."""
        token = self._check_id(token)
        if not self.sp_model.is_byte(token):
            return None
        return int(self.sp_model.id_to_piece(token)[3:5], 16)

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

    context: tokens that come before the streamed ones (a completion's prompt). Their text is not handed out,
    but they are decoded with the new tokens, so the chunks join to `decode(context + tokens)` minus
    `decode(context)`: the first token keeps its leading space, which decoding the new tokens alone drops
    (SentencePiece strips the first piece's word-boundary space). Only the context's last few tokens are kept,
    cut where the context's own text ends on a whole character (see `whole_char_end`); `offset` is the length
    of the text handed out so far.
    """

    CONTEXT = 4  # context tokens kept: one would do for the space rule; a few cover a character's bytes

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        end = whole_char_end(tokenizer, context)
        self._all: List[int] = list(context[max(0, end - self.CONTEXT):])  # the window's tokens start here
        self._n_context = len(self._all)
        self._start = 0  # the first token of the last chunk handed out: the decoding window starts here
        self._read = len(self._all) - (len(context) - end)  # tokens before this one are in the text handed out
        self.offset = 0  # characters handed out so far

    @property
    def tokens(self) -> List[int]:
        """The streamed tokens (the context left out)."""
        return self._all[self._n_context:]

    def push(self, token: int) -> str:
        self._all.append(token)
        before, text = self._window()
        if text.endswith("\ufffd") or not text.startswith(before) or len(text) == len(before):
            return ""  # an incomplete UTF-8 character (wait for its remaining bytes), or nothing visible yet
        self._start, self._read = self._read, len(self._all)
        return self._hand_out(text[len(before):])

    def finish(self) -> str:
        before, text = self._window()
        self._start = self._read = len(self._all)
        return self._hand_out(text[len(before):] if len(text) > len(before) else "")

    def _hand_out(self, text: str) -> str:
        self.offset += len(text)
        return text

    def _window(self) -> Tuple[str, str]:
        """The window's text up to the handed-out point, and with every token so far."""
        window = self._all[self._start:]
        return self.tokenizer.decode(window[:self._read - self._start]), self.tokenizer.decode(window)


def whole_char_end(tokenizer: Tokenizer, tokens: Sequence[int]) -> int:
    """The largest k such that tokens[:k] ends on a whole character: len(tokens) unless the tokens end with
    byte-fallback tokens holding only the first bytes of a UTF-8 character (then k is where those start).
    decode(tokens[:k]) is then a prefix of the decode of tokens followed by anything."""
    k = len(tokens)
    for back in range(1, min(4, len(tokens)) + 1):
        value = tokenizer.byte_value(tokens[k - back])
        if value is None:
            return k  # a piece: pieces hold whole characters
        if value >= 0xC0:  # a lead byte: 110xxxxx needs 2 bytes, 1110xxxx 3, 11110xxx 4
            need = 2 if value < 0xE0 else 3 if value < 0xF0 else 4
            return k - back if back < need else k
        if value < 0x80:
            return k  # an ASCII byte is a whole character
    return k
