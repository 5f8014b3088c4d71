"""SentencePiece tokenizers: Llama 2's (32000 BPE pieces with byte fallback) and Code Llama's (32016)."""

from __future__ import annotations

import re
from typing import Dict

from sentencepiece import SentencePieceProcessor

from .base import BaseTokenizer, PathLike, check_model_file

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class SentencePieceTokenizer(BaseTokenizer):
    kind = "sentencepiece"

    def __init__(self, model_path: PathLike) -> None:
        path = check_model_file(model_path)
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
        self.special_tokens: Dict[str, int] = {
            self.sp_model.id_to_piece(i): i for i in range(self.n_words)
            if self.sp_model.is_control(i) or self.sp_model.is_unknown(i)}
        self._encode_text, self._decode_ids = self.sp_model.encode, self.sp_model.decode

    def id_to_piece(self, token: int) -> str:
        return self.sp_model.id_to_piece(self._check_id(token))

    def token_bytes(self, token: int) -> bytes:
        piece = self.id_to_piece(token)
        match = _BYTE_PIECE.fullmatch(piece)
        if match and self.sp_model.is_byte(token):
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def piece_to_id(self, piece: str) -> int:
        token = self.sp_model.piece_to_id(piece)
        return token if token != self.sp_model.unk_id() or piece == self.sp_model.id_to_piece(token) else -1
