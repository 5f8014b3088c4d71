"""Tokenizers behind one small interface (base.BaseTokenizer): SentencePiece (Llama 2, Code Llama) and tiktoken
(Llama 3). `load` reads either, telling them apart by the file's format."""

from __future__ import annotations

import re

from .base import BaseTokenizer, PathLike, check_model_file
from .spm import SentencePieceTokenizer
from .tiktoken_bpe import TiktokenTokenizer

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+\r?\n")


def file_format(model_path: PathLike) -> str:
    """'tiktoken' for a file of `base64 rank` lines (Llama 3), else 'sentencepiece' (a protobuf: Llama 2)."""
    path = check_model_file(model_path)
    with open(path, "rb") as handle:
        head = handle.read(256)
    return "tiktoken" if _TIKTOKEN_LINE.match(head) else "sentencepiece"


def load(model_path: PathLike) -> BaseTokenizer:
    """The tokenizer of a tokenizer.model file, whichever format it is in."""
    if file_format(model_path) == "tiktoken":
        return TiktokenTokenizer(model_path)
    return SentencePieceTokenizer(model_path)


__all__ = ["BaseTokenizer", "SentencePieceTokenizer", "TiktokenTokenizer", "file_format", "load"]
