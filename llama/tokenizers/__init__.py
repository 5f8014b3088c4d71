"""Tokenizers behind one small interface (base.BaseTokenizer): SentencePiece (Llama 2, Code Llama) and tiktoken
(Llama 3). `tokenizer_class` is the one place a file's format picks its tokenizer: `load` and the released
`llama.Tokenizer(path)` both go through it."""

from __future__ import annotations

import re
from typing import Dict, Type

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


# Each file format's tokenizer, by the `kind` it reports (what a family's `tokenizer_kind` names).
KINDS: Dict[str, Type[BaseTokenizer]] = {cls.kind: cls for cls in (SentencePieceTokenizer, TiktokenTokenizer)}


def tokenizer_class(model_path: PathLike) -> Type[BaseTokenizer]:
    """The tokenizer class that reads this tokenizer.model file, chosen by its format (`file_format`)."""
    return KINDS[file_format(model_path)]


def load(model_path: PathLike) -> BaseTokenizer:
    """The tokenizer of a tokenizer.model file, whichever format it is in."""
    return tokenizer_class(model_path)(model_path)


__all__ = ["BaseTokenizer", "SentencePieceTokenizer", "TiktokenTokenizer", "KINDS", "file_format",
           "tokenizer_class", "load"]
