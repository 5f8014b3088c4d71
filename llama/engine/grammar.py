"""Structured output: a grammar (JSON schema, regular expression, Lark grammar or a list of choices) that
constrains what a row may sample, through llguidance (the optional `structured` extra).

Chosen by measurement (benchmarks/bench_grammar.py, 32k Llama 2 vocabulary): llguidance computes a token mask
in about 20 us and compiles a JSON schema in under 1 ms; xgrammar masks faster (about 4 us) but compiles in
about 20 ms and pulls in a GPU compiler stack; outlines-core takes about 0.5 ms per mask and 200 ms to compile.
A mask is small next to a decode step (milliseconds), so compile time and footprint decided.

`Grammar.compile` does every costly part once, when a request arrives, off the engine thread: it compiles the
grammar, builds its matcher and computes the first token mask, within budgets (MAX_GRAMMAR_CHARS of source,
COMPILE_SECONDS of time, llguidance's own limits in `limits()`), and raises ValueError (the unsupported
feature, the syntax error, the budget passed, a grammar that allows only an empty answer). Each row then gets
its own `Constraint`, a copy of that matcher: `mask(logits)` sets every token the grammar does not allow next to
-inf, `consume(token)` advances it. The stop tokens are allowed only where the grammar is complete, so a row
that stops with a stop token ("stop") always holds a whole match; a row that runs out of tokens ends with
"length". A matcher that fails later (a limit reached mid-answer) raises GrammarError, which ends that row's
request alone.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Sequence, Tuple

import torch

KINDS = ("json_schema", "regex", "grammar", "choice")
MAX_GRAMMAR_CHARS = 32 * 1024  # a grammar's source (schema JSON, regex, Lark text, choices) at most
COMPILE_SECONDS = 2.0  # compiling a grammar, building its matcher and its first mask, at most
MAX_ERROR_CHARS = 200  # of llguidance's message quoted in an error (it can quote the grammar)
PROBE_TOKENS = 8  # tokens a new grammar's matcher is walked at admission, to fail there rather than mid-answer
# llguidance's limits (LLParserLimits), set here rather than left to its defaults. The fuels and step_max_items
# bound the work of one step (a mask takes at most a few ms under them on this machine, EPYC Zen 4, while the
# default initial fuel let the regex (a{1000}){1000} take ~1 s); max_items_in_row is raised from 2000 so that
# an object of up to ~2,000 optional properties (what MAX_GRAMMAR_CHARS lets through) does not fail mid-answer.
LIMITS = dict(max_items_in_row=10_000, initial_lexer_fuel=200_000, step_lexer_fuel=100_000, step_max_items=50_000,
              max_lexer_states=20_000, max_grammar_size=100_000)
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="llama-grammar")


class GrammarError(RuntimeError):
    """A matcher that failed mid-answer (a limit of llguidance's reached): its request ends, alone."""


class GrammarBusy(RuntimeError):
    """Every grammar worker stayed busy (with other requests' grammars) for the whole time budget: retry later."""


def limits() -> Any:
    """llguidance's limits for every grammar (LIMITS; its messages without the grammar's text)."""
    return _ll().LLParserLimits(verbose_errors=False, **LIMITS)


def _short(message: Any) -> str:
    """llguidance's message on one line, cut at MAX_ERROR_CHARS."""
    text = " ".join(str(message).replace("<non-verbose/>", "").split())
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."
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


def _source(kind: str, spec: Any) -> Tuple[str, Any]:
    """(the grammar's source text, llguidance's grammar for it); ValueError for a spec of the wrong shape."""
    ll = _ll()
    if kind == "json_schema":
        if isinstance(spec, str):
            spec = json.loads(spec)
        if not isinstance(spec, dict):
            raise ValueError("a JSON schema must be an object")
        source = json.dumps(spec)
        return source, lambda: ll.LLMatcher.grammar_from_json_schema(spec, defaults={"whitespace_flexible": False})
    if kind in ("regex", "grammar"):
        if not isinstance(spec, str):
            raise ValueError("a regular expression must be a string" if kind == "regex" else
                             "a grammar must be a string (Lark syntax)")
        make = ll.LLMatcher.grammar_from_regex if kind == "regex" else ll.LLMatcher.grammar_from_lark
        return spec, lambda: make(spec)
    if not (isinstance(spec, list) and spec and all(isinstance(s, str) for s in spec)):
        raise ValueError("choices must be a non-empty list of strings")
    return json.dumps(spec), lambda: ll.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(s) for s in spec))


def _build(kind: str, spec: Any, tokenizer: Any, stop_ids: Sequence[int], vocab_size: int) -> "Grammar":
    """Grammar.compile's work (a worker thread): source, size cap, llguidance's grammar, its matcher, the first
    mask and what it allows."""
    ll = _ll()
    try:
        source, make = _source(kind, spec)
        if len(source) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"it is {len(source)} characters long; at most {MAX_GRAMMAR_CHARS} are allowed")
        compiled = make()
    except ValueError as err:
        raise ValueError(_short(err)) from None
    except Exception as err:  # llguidance's own errors (a schema it cannot read)
        raise ValueError(_short(err)) from None
    tok = _ll_tokenizer(tokenizer, stop_ids)
    failed, messages = ll.LLMatcher.validate_grammar_with_warnings(compiled, tok, limits=limits())
    if failed:
        raise ValueError(_short(messages[0]) if messages else "the grammar is invalid")
    matcher = ll.LLMatcher(tok, compiled, log_level=0, limits=limits())
    grammar = Grammar(kind, source, compiled, tok, vocab_size, matcher)
    allowed = _allowed(matcher, vocab_size)  # the first mask: llguidance's start-up work, here
    stops = [t for t in stop_ids if 0 <= t < vocab_size]
    if matcher.is_error():
        raise ValueError(f"it allows no answer ({_short(matcher.get_error())})")
    allowed[stops] = False
    if not bool(allowed.any()):
        raise ValueError("it allows only an empty answer")
    _probe(matcher.deep_copy(), allowed, stops, vocab_size)
    return grammar


def _probe(matcher: Any, allowed: torch.Tensor, stops: Sequence[int], vocab_size: int) -> None:
    """Walk up to PROBE_TOKENS tokens (each time the lowest allowed id that is not a stop token): a matcher
    that fails on the way (a lexer or parser limit) is a ValueError now rather than an error mid-answer."""
    for step in range(PROBE_TOKENS):
        matcher.consume_token(int(allowed.nonzero()[0]))
        allowed = _allowed(matcher, vocab_size)
        if matcher.is_error():
            raise ValueError(f"it fails after {step + 1} token(s): {_short(matcher.get_error())}")
        allowed[stops] = False
        if not bool(allowed.any()):
            return


_BITS = torch.arange(32, dtype=torch.int32)


def _allowed(matcher: Any, vocab_size: int) -> torch.Tensor:
    """A bool (vocab_size,) tensor from the matcher's next token mask (one bit per token of its tokenizer)."""
    raw = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
    bits = ((raw.unsqueeze(-1) >> _BITS) & 1).bool().reshape(-1)
    out = torch.zeros(vocab_size, dtype=torch.bool)
    n = min(vocab_size, bits.numel())
    out[:n] = bits[:n]
    return out


@dataclass(frozen=True)
class Grammar:
    """A checked grammar for one tokenizer: what rows of a request are held to."""

    kind: str
    source: str  # the schema (JSON text), the regex, the Lark grammar, or the choices (JSON list)
    compiled: str  # llguidance's grammar
    tokenizer: Any  # llguidance's tokenizer
    vocab_size: int
    matcher: Any = field(default=None, compare=False, repr=False)  # at the start, its first mask computed
    origin: str = field(default="", compare=False)  # the request field that asked for it (errors name it)

    @staticmethod
    def compile(kind: str, spec: Any, tokenizer: Any, stop_ids: Sequence[int], vocab_size: int,
                timeout: float = COMPILE_SECONDS) -> "Grammar":
        """kind: 'json_schema' (spec: a schema, dict or JSON text), 'regex', 'grammar' (Lark) or 'choice' (a list
        of strings). ValueError (llguidance's message: the unsupported key, the syntax error; or the budget
        passed) when it cannot be used. The work runs in a worker thread (llguidance drops the GIL), given
        `timeout` seconds once it starts; GrammarBusy when no worker is free within `timeout` either."""
        _ll()
        if kind not in KINDS:
            raise ValueError(f"unknown grammar kind {kind!r}; known: {', '.join(KINDS)}")
        started = threading.Event()

        def build() -> "Grammar":
            started.set()
            return _build(kind, spec, tokenizer, stop_ids, vocab_size)

        work = _pool.submit(build)
        if not started.wait(timeout) and work.cancel():
            raise GrammarBusy("the server is busy compiling other grammars: retry in a moment")
        try:
            return work.result(timeout)
        except concurrent.futures.TimeoutError:  # the build runs on within llguidance's limits; it is dropped
            raise ValueError(f"it takes over {timeout:g} s to compile: simplify it") from None

    def constraint(self) -> "Constraint":
        return Constraint(self)


class Constraint:
    """One row's place in its grammar."""

    def __init__(self, grammar: Grammar) -> None:
        if grammar.matcher is not None:  # a copy of the compiled start: cheap, so it may run on the engine thread
            self.matcher = grammar.matcher.deep_copy()
        else:
            self.matcher = _ll().LLMatcher(grammar.tokenizer, grammar.compiled, log_level=0, limits=limits())
        self.vocab_size = grammar.vocab_size

    def allowed(self) -> torch.Tensor:
        """A bool (vocab_size,) tensor: the tokens the grammar allows next."""
        return _allowed(self.matcher, self.vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """One row's logits (V,), in place: the tokens the grammar does not allow next set to -inf. GrammarError
        when the matcher has failed (then its mask would allow only the stop tokens: a 'stop' that does not
        parse)."""
        self._check()
        allowed = self.allowed()
        self._check()
        return logits.masked_fill_(~allowed.to(logits.device), float("-inf"))

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GrammarError(f"the grammar failed mid-answer: {_short(self.matcher.get_error())}")
