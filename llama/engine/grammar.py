"""Structured output: a grammar (JSON schema, regular expression, Lark grammar or a list of choices) that
constrains what a row may sample, through llguidance (the optional `structured` extra).

Chosen by measurement (benchmarks/bench_grammar.py, 32k Llama 2 vocabulary): llguidance computes a token mask
in about 20 us and compiles a JSON schema in under 1 ms; xgrammar masks faster (about 4 us) but compiles in
about 20 ms and pulls in a GPU compiler stack; outlines-core takes about 0.5 ms per mask and 200 ms to compile.
A mask is small next to a decode step (milliseconds), so compile time and footprint decided.

`Grammar.compile` checks a grammar once, when a request arrives (ValueError naming the unsupported feature or
the syntax error); each row then gets its own `Constraint`: `mask(logits)` sets every token the grammar does not
allow next to -inf, `consume(token)` advances it. The stop tokens are allowed only where the grammar is
complete, so a row that stops with a stop token ("stop") always holds a whole match; a row that runs out of
tokens ends with "length".
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Dict, Sequence, Tuple

import torch

KINDS = ("json_schema", "regex", "grammar", "choice")
_tokenizers: Dict[Tuple[int, Tuple[int, ...]], Any] = {}
_lock = threading.Lock()


def _ll():
    try:
        import llguidance
    except ImportError:
        raise ValueError("structured output needs llguidance: pip install 'llama[structured]'") from None
    return llguidance


def _ll_tokenizer(tokenizer: Any, stop_ids: Sequence[int]) -> Any:
    """llguidance's view of our tokenizer (each token's bytes; the special ones marked), built once per tokenizer."""
    key = (id(tokenizer), tuple(sorted(stop_ids)))
    with _lock:
        if key not in _tokenizers:
            ll = _ll()
            n = tokenizer.n_words
            encode = _bare_encoder(tokenizer)
            special = sorted({tokenizer.bos_id, tokenizer.eos_id, *stop_ids} |
                             {i for i in range(n) if tokenizer.id_to_piece(i) in ("<unk>",)})

            class View:
                eos_token_id, bos_token_id, special_token_ids = tokenizer.eos_id, tokenizer.bos_id, special
                tokens = [tokenizer.token_bytes(i) for i in range(n)]

                def __call__(self, text):
                    return encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)

            _tokenizers[key] = ll.LLTokenizer(ll.TokenizerWrapper(View()), eos_token=sorted(stop_ids))
        return _tokenizers[key]


def _bare_encoder(tokenizer: Any):
    """Text -> token ids as they spell that text inside an answer: SentencePiece's encode puts a word-boundary
    space before the text (its dummy prefix), which llguidance must not see; encoding after a newline and
    dropping the newline's tokens leaves it out."""
    probe = tokenizer.encode("a", bos=False, eos=False)
    if not tokenizer.token_bytes(probe[0]).startswith(b" "):
        return lambda text: tokenizer.encode(text, bos=False, eos=False)
    head = tokenizer.encode("\n", bos=False, eos=False)

    def encode(text: str):
        ids = tokenizer.encode("\n" + text, bos=False, eos=False)
        if ids[:len(head)] != head:  # not expected: fall back to the plain encoding
            return tokenizer.encode(text, bos=False, eos=False)
        return ids[len(head):]
    return encode


@dataclass(frozen=True)
class Grammar:
    """A checked grammar for one tokenizer: what rows of a request are held to."""

    kind: str
    source: str  # the schema (JSON text), the regex, the Lark grammar, or the choices (JSON list)
    compiled: str  # llguidance's grammar
    tokenizer: Any  # llguidance's tokenizer
    vocab_size: int

    @staticmethod
    def compile(kind: str, spec: Any, tokenizer: Any, stop_ids: Sequence[int], vocab_size: int) -> "Grammar":
        """kind: 'json_schema' (spec: a schema, dict or JSON text), 'regex', 'grammar' (Lark) or 'choice' (a list
        of strings). ValueError (llguidance's message: the unsupported key, the syntax error) when it cannot be
        used."""
        ll = _ll()
        if kind not in KINDS:
            raise ValueError(f"unknown grammar kind {kind!r}; known: {', '.join(KINDS)}")
        try:
            if kind == "json_schema":
                if isinstance(spec, str):
                    spec = json.loads(spec)
                if not isinstance(spec, dict):
                    raise ValueError("a JSON schema must be an object")
                compiled = ll.LLMatcher.grammar_from_json_schema(spec, defaults={"whitespace_flexible": False})
                source = json.dumps(spec)
            elif kind == "regex":
                if not isinstance(spec, str):
                    raise ValueError("a regular expression must be a string")
                compiled, source = ll.LLMatcher.grammar_from_regex(spec), spec
            elif kind == "grammar":
                if not isinstance(spec, str):
                    raise ValueError("a grammar must be a string (Lark syntax)")
                compiled, source = ll.LLMatcher.grammar_from_lark(spec), spec
            else:
                if not (isinstance(spec, list) and spec and all(isinstance(s, str) for s in spec)):
                    raise ValueError("choices must be a non-empty list of strings")
                compiled = ll.LLMatcher.grammar_from_lark(
                    "start: " + " | ".join(json.dumps(s) for s in spec))
                source = json.dumps(spec)
        except ValueError:
            raise
        except Exception as err:  # llguidance's own errors (a schema it cannot read)
            raise ValueError(" ".join(str(err).split())[:400]) from None
        tok = _ll_tokenizer(tokenizer, stop_ids)
        failed, messages = ll.LLMatcher.validate_grammar_with_warnings(compiled, tok)
        if failed:
            raise ValueError(" ".join(messages[0].split())[:400] if messages else "the grammar is invalid")
        return Grammar(kind, source, compiled, tok, vocab_size)

    def constraint(self) -> "Constraint":
        return Constraint(self)


class Constraint:
    """One row's place in its grammar."""

    def __init__(self, grammar: Grammar) -> None:
        self.matcher = _ll().LLMatcher(grammar.tokenizer, grammar.compiled)
        self.vocab_size = grammar.vocab_size
        self.words = (grammar.tokenizer.vocab_size + 31) // 32
        self._bits = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """A bool (vocab_size,) tensor: the tokens the grammar allows next."""
        raw = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)[:self.words]
        bits = ((raw.unsqueeze(-1) >> self._bits) & 1).bool().reshape(-1)
        out = torch.zeros(self.vocab_size, dtype=torch.bool)
        n = min(self.vocab_size, bits.numel())
        out[:n] = bits[:n]
        return out

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """One row's logits (V,), in place: the tokens the grammar does not allow next set to -inf."""
        if self.matcher.is_error():
            raise RuntimeError(f"the grammar failed: {self.matcher.get_error()}")
        return logits.masked_fill_(~self.allowed().to(logits.device), float("-inf"))

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)
