"""The released `Tokenizer` name (either tokenizer file of the family) and `TextStream`, text as it streams."""

from __future__ import annotations

import os
from typing import List, Tuple, Union

from .tokenizers import BaseTokenizer, SentencePieceTokenizer, TiktokenTokenizer, file_format


class Tokenizer(SentencePieceTokenizer):
    """Text <-> token ids, with the BOS/EOS handling of the released references.

    The released name: `Tokenizer(path)` reads either tokenizer file of the family. A SentencePiece model
    (Llama 2, Code Llama) gives this class; a tiktoken vocabulary (Llama 3) gives a `TiktokenTokenizer`, which
    offers the same interface (`llama.tokenizers.BaseTokenizer`).
    """

    def __new__(cls, model_path: Union[str, os.PathLike]) -> BaseTokenizer:
        if cls is Tokenizer and file_format(model_path) == "tiktoken":
            return TiktokenTokenizer(model_path)
        return super().__new__(cls)


class TextStream:
    """The text of a growing token sequence, handed out in chunks of whole characters.

    `push(token)` returns the text the token completes ("" when it completes none): bytes of a character split
    over byte-fallback tokens are held back until the character is whole, and SentencePiece's word-boundary
    spaces are kept. `finish()` returns what is still held (an unfinished character as U+FFFD). The chunks join
    to exactly `tokenizer.decode` of all the tokens. Each push decodes only the tokens from the start of the
    previous chunk on (they give the new token its word-boundary context), so a long answer costs O(n), not
    O(n^2). Every streaming path (Llama's streams, the server) uses this one helper.
    """

    def __init__(self, tokenizer: BaseTokenizer) -> None:
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
