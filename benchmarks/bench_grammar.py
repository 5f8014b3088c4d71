"""Per-token mask cost of three grammar engines on the Llama 2 32k vocabulary: llguidance, xgrammar and
outlines-core, each driven through its own API over the same JSON schema and the same answer's tokens.

For each engine: the grammar's compile time, then, for each token of a valid answer, the time to compute the
next-token mask (allowed ids over the whole vocabulary) and to advance by the token. Engines alternate per
round; medians over rounds. An engine that is not installed is reported as such. Prints JSON.

    python benchmarks/bench_grammar.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "llama2-tokenizer.model"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "email", "tags", "address"], "additionalProperties": False}
ANSWER = json.dumps({"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
                     "tags": ["mathematics", "poetry", "engines"],
                     "address": {"city": "London", "zip": "W1 2AB"}}, separators=(",", ":"))


def llguidance_run(sp, vocab, tokens: List[int]) -> Callable[[], Dict[str, float]]:
    import llguidance
    import llguidance.torch as lt

    class Wrapped:
        eos_token_id, bos_token_id = sp.eos_id(), sp.bos_id()
        special_token_ids = [sp.unk_id(), sp.bos_id(), sp.eos_id()]

        def __init__(self):
            self.tokens = vocab

        def __call__(self, text):
            return sp.encode(text.decode("utf-8") if isinstance(text, bytes) else text)

    tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})

    def run() -> Dict[str, float]:
        t0 = time.perf_counter()
        m = llguidance.LLMatcher(tok, grammar)
        compile_s = time.perf_counter() - t0
        mask = lt.allocate_token_bitmask(1, len(vocab))
        mask_s = 0.0
        for t in tokens:
            t1 = time.perf_counter()
            lt.fill_next_token_bitmask(m, mask, 0)
            mask_s += time.perf_counter() - t1
            assert m.consume_token(t), m.get_error()
        return {"compile_ms": compile_s * 1e3, "mask_us_per_token": mask_s / len(tokens) * 1e6}
    return run


def xgrammar_run(sp, vocab, tokens: List[int]) -> Callable[[], Dict[str, float]]:
    import xgrammar as xgr

    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    info = xgr.TokenizerInfo(pieces, vocab_type=xgr.VocabType.BYTE_FALLBACK, vocab_size=len(pieces),
                             stop_token_ids=[sp.eos_id()], add_prefix_space=True)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)

    def run() -> Dict[str, float]:
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
        m = xgr.GrammarMatcher(compiled)
        compile_s = time.perf_counter() - t0
        mask = xgr.allocate_token_bitmask(1, len(pieces))
        mask_s = 0.0
        for t in tokens:
            t1 = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            mask_s += time.perf_counter() - t1
            assert m.accept_token(t)
        return {"compile_ms": compile_s * 1e3, "mask_us_per_token": mask_s / len(tokens) * 1e6}
    return run


def outlines_run(sp, vocab, tokens: List[int]) -> Callable[[], Dict[str, float]]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    table: Dict[bytes, List[int]] = {}
    for i, raw in enumerate(vocab):
        if i not in (sp.unk_id(), sp.bos_id(), sp.eos_id()):
            table.setdefault(raw, []).append(i)
    vocabulary = Vocabulary(sp.eos_id(), table)
    regex = build_regex_from_schema(json.dumps(SCHEMA))

    def run() -> Dict[str, float]:
        t0 = time.perf_counter()
        guide = Guide(Index(regex, vocabulary))
        compile_s = time.perf_counter() - t0
        mask_s = 0.0
        for t in tokens:
            t1 = time.perf_counter()
            allowed = guide.get_tokens()  # the allowed ids (the mask, as a list)
            mask_s += time.perf_counter() - t1
            assert t in allowed
            guide.advance(t)
        return {"compile_ms": compile_s * 1e3, "mask_us_per_token": mask_s / len(tokens) * 1e6}
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import platform

    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER))
    from llama.tokenizer import Tokenizer

    ours = Tokenizer(str(TOKENIZER))
    vocab = [ours.token_bytes(i) for i in range(sp.get_piece_size())]
    tokens = sp.encode(ANSWER)
    tokens[0] = sp.piece_to_id(sp.id_to_piece(tokens[0]).lstrip("\u2581"))  # no dummy-prefix space: '{"'
    runs, report = {}, {"vocab_size": len(vocab), "answer_tokens": len(tokens), "engines": {}}
    for name, make in (("llguidance", llguidance_run), ("xgrammar", xgrammar_run), ("outlines-core", outlines_run)):
        try:
            runs[name] = make(sp, vocab, tokens)
        except ImportError as err:
            report["engines"][name] = {"skipped": f"not installed: {err}"}
    results: Dict[str, List[Dict[str, float]]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            results[name].append(run())
    for name, rows in results.items():
        report["engines"][name] = {key: round(statistics.median(r[key] for r in rows), 2) for key in rows[0]}
    report["machine"] = platform.processor() or platform.machine()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
