"""The one sampler: each row's next token from its logits, under that row's own parameters and generator.

Order, as transformers and vLLM apply them: logit_bias, then the penalties (transformers' repetition_penalty
over prompt and answer; OpenAI's presence and frequency penalties over the answer), then a grammar's mask
(structured output: the tokens it forbids next at -inf; grammar.py), then temperature, top-k,
top-p over what top-k kept, min-p, and a draw with the row's generator. Greedy rows take the argmax of the
adjusted logits. Ties are ranked as argmax ranks them (the lower token id first: a stable sort of the logits
themselves, not of probabilities that rounding may tie), and min_p = 1 keeps the first-ranked token alone, so
top_k = 1, min_p = 1 and any nucleus that keeps one token each choose exactly the greedy token. Every operation works row by row, so a row samples the same token whatever rows share its
batch. Every rank of a model-parallel group samples from identical logits with identically seeded generators,
so they agree without communicating.

Log-probs are the model's own (before any adjustment), from one log-softmax: `log_probs`.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from .params import SamplingParams


class RowSampler:
    """One sequence's sampling state: parameters, generator, and the tokens the penalties look at."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int], seed: int, device: torch.device) -> None:
        self.params = params
        self.generator = None if params.greedy else torch.Generator(device=device).manual_seed(seed)
        self.seen = set(prompt) if params.repetition_penalty != 1.0 else set()  # prompt + answer
        self.counts: Counter = Counter()  # answer tokens, for presence and frequency penalties
        self.constraint = params.grammar.constraint() if params.grammar is not None else None

    def record(self, token: int) -> None:
        if self.constraint is not None:
            self.constraint.consume(token)
        if self.params.penalized:
            self.counts[token] += 1
            if self.params.repetition_penalty != 1.0:
                self.seen.add(token)

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """logit_bias and penalties applied to one row's logits (V,), in place."""
        p = self.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            logits[ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        if p.repetition_penalty != 1.0 and self.seen:
            ids = torch.tensor(sorted(self.seen), device=logits.device)
            score = logits[ids]
            logits[ids] = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self.counts:
            ids = torch.tensor(list(self.counts), device=logits.device)
            counts = torch.tensor(list(self.counts.values()), dtype=logits.dtype, device=logits.device)
            logits[ids] -= p.frequency_penalty * counts + p.presence_penalty
        if self.constraint is not None:  # last: whatever the grammar forbids is out, whatever the biases
            self.constraint.mask(logits)
        return logits

    @property
    def adjusts(self) -> bool:
        return bool(self.params.logit_bias) or self.params.penalized or self.constraint is not None


def choose(logits: torch.Tensor, rows: Sequence[RowSampler]) -> List[int]:
    """(R, V) logits, one RowSampler per row -> R token ids."""
    logits = logits.float()
    if any(r.adjusts for r in rows):
        logits = logits.clone()
        for i, r in enumerate(rows):
            if r.adjusts:
                r.adjust(logits[i])
    out = torch.argmax(logits, dim=-1)
    hot = [i for i, r in enumerate(rows) if r.generator is not None]
    if hot:
        drawn = _draw(logits[torch.tensor(hot, device=logits.device)], [rows[i] for i in hot])
        out[torch.tensor(hot, device=logits.device)] = drawn
    return out.tolist()


def _draw(logits: torch.Tensor, rows: Sequence[RowSampler]) -> torch.Tensor:
    probs, order = _nucleus(logits, [r.params for r in rows])
    picks = [torch.multinomial(probs[j], 1, generator=r.generator) for j, r in enumerate(rows)]
    return order.gather(-1, torch.stack(picks)).squeeze(-1)


def _nucleus(logits: torch.Tensor, params: Sequence[SamplingParams]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k, top-p (over what top-k kept) and min-p: the distribution each row draws from, in
    descending order of probability, with that order."""
    device = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device).unsqueeze(1)
    # Rank by the logits, stably: rank 0 is argmax's token (the first of tied maxima), whatever the temperature.
    ordered, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    # Subtracting the maximum first keeps logits / T finite however small T is (down to MIN_TEMPERATURE).
    probs = torch.softmax((ordered - ordered[:, :1]) / temps, dim=-1)
    ranks = torch.arange(probs.shape[-1], device=device)
    top_k = torch.tensor([p.top_k or probs.shape[-1] for p in params], device=device).unsqueeze(1)
    probs = probs.masked_fill(ranks >= top_k, 0.0)
    kept = probs / probs.sum(dim=-1, keepdim=True)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device).unsqueeze(1)
    probs = probs.masked_fill(kept.cumsum(dim=-1) - kept > top_p, 0.0)
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device).unsqueeze(1)
    probs = probs.masked_fill(probs < min_p * probs[:, :1], 0.0)
    probs = probs.masked_fill((min_p >= 1.0) & (ranks > 0), 0.0)  # min_p 1: the top token alone, not its ties
    return probs / probs.sum(dim=-1, keepdim=True), order


def distribution(logits: torch.Tensor, rows: Sequence[RowSampler]) -> torch.Tensor:
    """What each sampled row draws from (R, V), in vocabulary order, after every adjustment (for tests and
    speculative decoding's acceptance rule)."""
    logits = logits.float().clone()
    for i, r in enumerate(rows):
        if r.adjusts:
            r.adjust(logits[i])
    probs, order = _nucleus(logits, [r.params for r in rows])
    return torch.zeros_like(probs).scatter_(-1, order, probs)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """The model's log-probabilities over the vocabulary (float32): every log-prob this library reports."""
    return torch.log_softmax(logits.float(), dim=-1)


def token_log_probs(logits: torch.Tensor, tokens: Iterable[int]) -> List[float]:
    """log p(tokens[i] | row i) for logits (R, V)."""
    ids = torch.tensor(list(tokens), device=logits.device).unsqueeze(-1)
    return log_probs(logits).gather(-1, ids).squeeze(-1).tolist()


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The released reference's nucleus draw, kept as a public helper: from the smallest set of likeliest tokens
    whose probabilities reach p, for each row of probs (B, V)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sort = probs_sort.masked_fill(probs_sort.cumsum(dim=-1) - probs_sort > p, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    return probs_idx.gather(-1, torch.multinomial(probs_sort, num_samples=1, generator=generator)).squeeze(-1)
