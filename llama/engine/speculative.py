"""Speculative decoding: cheap guesses of a row's next tokens, checked by the model in one forward pass.

A drafter proposes up to k tokens d1..dk that may follow a row's sequence (prompt + answer so far). The engine
then decodes the row's pending token and its drafts together, 1 + k tokens in one pass (at batch 1 a decode
step reads every weight once whatever the token count, so checking k drafts costs little more than one step),
and keeps drafts by the rules in `accept_greedy` and `accept_sampled`, which make the output exactly plain
decoding's: the same tokens for greedy rows, the same distribution for sampled ones. Each step emits between
1 and k + 1 tokens per row.

Two drafters:
- `NgramDrafter` (prompt lookup): the tokens that followed the latest earlier occurrence of the sequence's last
  n tokens (n from 3 down to 1). No second model; it pays off where answers repeat their prompt (editing code,
  quoting a document) or themselves.
- `ModelDrafter`: a small model sharing the target's tokenizer proposes k tokens greedily. It keeps its own KV
  cache rows in step with the engine's rows: each step it catches up on the tokens accepted since its last
  proposal, then decodes k - 1 more.

Greedy drafts are a deterministic proposal q (all its mass on d), so the standard rejection rule (accept d with
probability min(1, p(d)/q(d)), else draw from the normalised max(0, p - q)) reads: accept d with probability
p(d), else draw from p with d removed. Every token it emits is distributed as p, the row's own distribution
after bias, penalties (updated token by token), temperature, top-k, top-p and min-p.

Speculation is off in deterministic mode and with compiled decode steps: its verification passes change shape
with the number of drafts, which neither a fixed-shape (batch-invariant) step nor a captured graph allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..model.decode_step import DecodeStep
from .sampler import RowSampler, choose, distribution

MAX_DRAFT_TOKENS = 32
NGRAM_MAX = 3  # the longest tail prompt lookup matches (then shorter ones, down to one token)


@dataclass
class DraftRow:
    """One running row asking for drafts: its cache row, an identity that changes when the row is reused,
    its whole sequence (prompt + answer, the pending token last) and how many drafts it can take."""

    row: int
    key: object
    tokens: List[int]
    k: int


class Drafter:
    """Proposes drafts for several rows at once; `propose` returns one list (possibly empty) per row."""

    name = "drafter"

    def propose(self, rows: Sequence[DraftRow]) -> List[List[int]]:
        raise NotImplementedError


def lookup(tokens: Sequence[int], k: int, max_n: int = NGRAM_MAX) -> List[int]:
    """Prompt lookup: the k tokens that followed the most recent earlier occurrence of the last n tokens of
    `tokens`, trying n = max_n down to 1; [] when no tail occurs earlier. Where the occurrence is so recent that
    fewer than k tokens follow it, the copy goes on into its own proposal (as an LZ77 match does), so a loop of
    period p is proposed in full rather than cut after p tokens."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), 0, -1):
        tail = list(tokens[length - n:])
        last = tail[-1]
        for end in range(length - 2, n - 2, -1):  # the occurrence ends at `end`, before the tail's own end
            if tokens[end] == last and list(tokens[end - n + 1:end + 1]) == tail:
                out: List[int] = []
                for i in range(end + 1, end + 1 + k):
                    out.append(tokens[i] if i < length else out[i - length])
                return out
    return []


class NgramDrafter(Drafter):
    """Prompt-lookup drafting (see `lookup`): no model, no state."""

    name = "ngram"

    def __init__(self, max_n: int = NGRAM_MAX) -> None:
        self.max_n = max_n

    def propose(self, rows: Sequence[DraftRow]) -> List[List[int]]:
        return [lookup(r.tokens, r.k, self.max_n) if r.k > 0 else [] for r in rows]


class ModelDrafter(Drafter):
    """A draft model (same tokenizer, its own KV cache with as many rows and positions as the target's) that
    proposes k tokens greedily for each row, all rows in one batch."""

    name = "draft model"

    def __init__(self, model) -> None:
        self.model = model
        if model.pool_blocks < model.tables.map_rows():  # rows of its own: a row cache's memory, as before
            model.setup_cache(model.rope.device, model.layers[0].attention_norm.weight.dtype, kv_dtype=model.kv_dtype)
        self.device = model.rope.device
        self._step = DecodeStep(model, compiled=False)  # eager: on the own CPU kernels, the fused C step
        self._cached: Dict[int, Tuple[object, int]] = {}  # row -> (key, tokens of the sequence in the cache)

    @torch.inference_mode()
    def propose(self, rows: Sequence[DraftRow]) -> List[List[int]]:
        wanted = [r for r in rows if r.k > 0]
        if not wanted:
            return [[] for _ in rows]
        width = 1 + max(r.row for r in wanted)
        for row in range(width):  # rows decoded idle below write at positions 0..k: their caches start over
            if row not in {r.row for r in wanted}:
                self._cached.pop(row, None)
        fresh, news = [], {}
        for r in wanted:
            key, start = self._cached.get(r.row, (None, 0))
            if key is r.key and start < len(r.tokens):
                news[r.row] = (start, r.tokens[start:])
            else:
                fresh.append(r)
        last_logits: Dict[int, torch.Tensor] = {}
        if news:  # rows catching up on the tokens kept since their last drafts, in one pass
            span = max(len(new) for _, new in news.values())
            tokens, positions = _padded(width, span, {row: (list(range(s, s + len(t))), t)
                                                      for row, (s, t) in news.items()})
            last = [len(news[row][1]) - 1 if row in news else 0 for row in range(width)]
            logits = self.model.decode_many(torch.tensor(tokens, device=self.device),
                                            torch.tensor(positions, device=self.device),
                                            1 + max(max(p) for p in positions),
                                            logits_at=torch.tensor(last, device=self.device).unsqueeze(1))[:, 0]
            last_logits.update({row: logits[row] for row in news})
        if fresh:  # new rows: their whole sequence in one packed prefill (after the pass above, which wrote
            # position 0 of these rows as idle ones)
            logits = self.model.prefill([r.tokens for r in fresh], rows=[r.row for r in fresh])
            last_logits.update({r.row: logits[i] for i, r in enumerate(fresh)})
        drafts: Dict[int, List[int]] = {r.row: [] for r in wanted}
        here = [0] * width  # each row's last position so far
        for r in wanted:
            here[r.row] = len(r.tokens) - 1
        nxt = torch.zeros(width, dtype=torch.long, device=self.device)
        for row, row_logits in last_logits.items():
            nxt[row] = row_logits.argmax(-1)
        most = max(r.k for r in wanted)
        for step in range(most):
            picks = nxt.tolist()
            for r in wanted:
                if step < r.k:
                    drafts[r.row].append(picks[r.row])
            if step + 1 == most:
                break
            here = [p + 1 for p in here]
            nxt = self._step(nxt, here).argmax(-1)
        for r in wanted:
            self._cached[r.row] = (r.key, len(r.tokens))
        return [drafts[r.row] if r.k > 0 else [] for r in rows]


def _padded(width: int, span: int, rows: Dict[int, Tuple[List[int], List[int]]], idle: int = 0
            ) -> Tuple[List[List[int]], List[List[int]]]:
    """(tokens, positions) lists of shape (width, span): row r holds its (positions, tokens), then repeats its
    last pair; rows not given decode token 0 at position `idle` (-1: the paged cache's null block; 0: a draft
    model's own row)."""
    tokens = [[0] * span for _ in range(width)]
    positions = [[idle] * span for _ in range(width)]
    for row, (pos, toks) in rows.items():
        tokens[row] = toks + [toks[-1]] * (span - len(toks))
        positions[row] = pos + [pos[-1]] * (span - len(pos))
    return tokens, positions


def verification(width: int, rows: Dict[int, Tuple[int, int, List[int]]], idle: int = -1
                 ) -> Tuple[List[List[int]], List[List[int]]]:
    """A verification pass's tokens and positions (width, 1 + most drafts): for each row (pending token, its
    position, drafts), the pending token and the drafts at consecutive positions."""
    span = 1 + max(len(d) for _, _, d in rows.values())
    return _padded(width, span, {row: (list(range(p, p + 1 + len(d))), [t] + d) for row, (t, p, d) in rows.items()},
                   idle)


def accept_greedy(logits: torch.Tensor, drafts: Sequence[int], sampler: RowSampler, take) -> int:
    """A greedy row: emit the argmax of each position's adjusted logits while it equals the draft there, then
    the first that differs (or, after all drafts, the bonus). logits (1 + len(drafts), V). `take(token, i)`
    emits a token (recording it in the sampler's penalties) and returns False when the row has finished.
    Returns the number of drafts accepted."""
    tops = logits.argmax(-1).tolist() if not sampler.adjusts else None
    for i in range(len(drafts) + 1):
        token = tops[i] if tops is not None else choose(logits[i:i + 1], [sampler])[0]
        if not take(token, i) or i == len(drafts) or token != drafts[i]:
            return i
    return len(drafts)


def accept_sampled(logits: torch.Tensor, drafts: Sequence[int], sampler: RowSampler, take) -> int:
    """A sampled row, by the rejection rule for a deterministic proposal (module docstring): draft d at position
    i is kept with probability p_i(d), u drawn from the row's own generator; on rejection the token is drawn from
    p_i without d, renormalised; after all drafts a bonus token is drawn from the last position. Returns the
    number of drafts accepted."""
    for i, d in enumerate(drafts):
        p = distribution(logits[i:i + 1], [sampler])[0]
        u = torch.rand((), generator=sampler.generator, device=p.device)
        if u < p[d]:
            if not take(d, i):
                return i + 1
            continue
        p[d] = 0.0
        token = int(torch.multinomial(p / p.sum(), 1, generator=sampler.generator))
        take(token, i)
        return i
    n = len(drafts)
    take(choose(logits[n:n + 1], [sampler])[0], n)
    return n


@dataclass
class Speculation:
    """What an engine speculates with: a drafter and at most k drafts per row per step; counts what it did."""

    drafter: Drafter
    k: int = 4
    proposed: int = 0  # drafts checked
    accepted: int = 0  # drafts kept
    passes: int = 0  # verification passes

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or not 1 <= self.k <= MAX_DRAFT_TOKENS:
            raise ValueError(f"num_draft_tokens must be an integer 1..{MAX_DRAFT_TOKENS}, got {self.k!r}")

    @property
    def acceptance(self) -> Optional[float]:
        """Share of proposed drafts that were kept (None before any)."""
        return self.accepted / self.proposed if self.proposed else None

    def reset(self) -> None:
        self.proposed = self.accepted = self.passes = 0


def check_choice(speculative) -> None:
    """ValueError unless `speculative` is None, "ngram" or a path (a draft checkpoint folder, checked when read)."""
    if speculative is not None and (not isinstance(speculative, str) or not speculative):
        raise ValueError(f"speculative must be None, 'ngram' or a draft checkpoint folder, got {speculative!r}")
