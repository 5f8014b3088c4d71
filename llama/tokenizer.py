"""The released `Tokenizer` name (either tokenizer file of the family) and `TextStream`, text as it streams."""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

from .tokenizers import BaseTokenizer, SentencePieceTokenizer, tokenizer_class


class Tokenizer(SentencePieceTokenizer):
    """Text <-> token ids, with the BOS/EOS handling of the released references.

    The released name: `Tokenizer(path)` reads either tokenizer file of the family. A SentencePiece model
    (Llama 2, Code Llama) gives this class; a file of another format gives the tokenizer that
    `llama.tokenizers.tokenizer_class` picks for it (tiktoken, Llama 3: a `TiktokenTokenizer`), which offers the
    same interface (`llama.tokenizers.BaseTokenizer`).
    """

    def __new__(cls, model_path: Union[str, os.PathLike]) -> BaseTokenizer:
        if cls is Tokenizer:
            chosen = tokenizer_class(model_path)
            if not issubclass(cls, chosen):
                return chosen(model_path)
        return super().__new__(cls)


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

    def __init__(self, tokenizer: BaseTokenizer, context: Sequence[int] = ()) -> None:
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


def whole_char_end(tokenizer: BaseTokenizer, tokens: Sequence[int]) -> int:
    """The largest k such that tokens[:k] ends on a whole character: len(tokens) unless the last tokens hold only
    the first bytes of a UTF-8 character (byte-fallback pieces, or tiktoken's byte-level tokens); then k is where
    the token holding that character's lead byte starts. decode(tokens[:k]) is then a prefix of the decode of
    tokens followed by anything."""
    k = len(tokens)
    tail = b""
    for back in range(1, min(4, k) + 1):
        tail = tokenizer.token_bytes(tokens[k - back]) + tail
        missing = _missing_bytes(tail)
        if missing == 0:
            return k
        if missing > 0:  # the lead byte is in this token (the tokens after it held continuation bytes only)
            return k - back
    return k


def _missing_bytes(raw: bytes) -> int:
    """How many bytes the UTF-8 character at the end of raw still lacks (0: raw ends on a whole character; -1:
    no lead byte in the last four bytes, as at the start of a slice)."""
    for back in range(1, min(4, len(raw)) + 1):
        byte = raw[-back]
        if byte < 0x80:
            return 0 if back == 1 else -1
        if byte >= 0xC0:
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return max(0, need - back)
    return -1
