"""TextStream: the incremental detokenizer every stream uses hands out whole characters and joins exactly."""

from __future__ import annotations

import random
from typing import List

import pytest

from helpers import TOKENIZER
from llama.tokenizer import TextStream, Tokenizer

SPACE, NEWLINE, HELLO, WORLD, BANG = 29871, 13, 15043, 3186, 29991
# Word-boundary pieces, CJK, lone and paired byte-fallback tokens (lead and continuation bytes), <unk>/<s>/</s>.
TRICKY = sorted({SPACE, 259, NEWLINE, HELLO, WORLD, BANG, 30793, 30967, 30357, 35, 243, 162, 155, 131, 236, 193,
                 209, 172, 0, 1, 2})


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TOKENIZER)


def whole_decodes(tok: Tokenizer, tokens: List[int]) -> List[str]:
    """The plain definition: decode everything after each token, hand out the growth once it is whole."""
    sent, out = "", []
    for n in range(1, len(tokens) + 1):
        text = tok.decode(tokens[:n])
        if text.endswith("\ufffd") or not text.startswith(sent) or len(text) == len(sent):
            continue
        out.append(text[len(sent):])
        sent = text
    final = tok.decode(tokens)
    return out + ([final[len(sent):]] if len(final) > len(sent) else [])


def chunks_of(tok: Tokenizer, tokens: List[int]) -> List[str]:
    stream = TextStream(tok)
    out = [c for c in (stream.push(t) for t in tokens) if c]
    rest = stream.finish()
    return out + ([rest] if rest else [])


def test_emoji_from_bytes_comes_as_one_chunk(tok):
    assert chunks_of(tok, [HELLO, SPACE, 30793, 30967, 243, 162, 155, 131, BANG]) == \
        ["Hello", " ", "世", "界", "😀", "!"]


def test_unfinished_character_is_handed_out_at_finish(tok):
    stream = TextStream(tok)
    assert [stream.push(t) for t in (HELLO, 243, 162)] == ["Hello", "", ""]
    assert stream.finish() == tok.decode([HELLO, 243, 162])[len("Hello"):]


def test_random_sequences_match_whole_decoding(tok):
    rng = random.Random(7)
    for _ in range(3000):
        tokens = [rng.choice(TRICKY) if rng.random() < 0.7 else rng.randrange(tok.n_words)
                  for _ in range(rng.randint(1, 16))]
        chunks = chunks_of(tok, tokens)
        assert chunks == whole_decodes(tok, tokens), tokens
        assert "".join(chunks) == tok.decode(tokens)
