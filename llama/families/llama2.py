"""Llama 2 (7B, 13B, 70B and their chat models): SentencePiece, [INST] dialogs, plain RoPE, 4096 tokens."""

from __future__ import annotations

from .base import Family


class Llama2(Family):
    name = "llama2"
    title = "Llama 2"


FAMILY = Llama2()
