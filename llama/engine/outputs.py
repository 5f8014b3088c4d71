"""From a step's logits to each choice's events: sampling with the request's own parameters and generator, text,
stop tokens and strings, lengths, log-probs, and the end of choices."""

from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import torch

from . import spec_glue
from .events import Chunk, Event, TokenLogprob, token_text, top_entries
from .sampler import choose, log_probs
from .state import Choice

log = logging.getLogger("llama.engine")


class Outputs:
    """The output side of one engine (engine.py holds the state)."""

    def __init__(self, engine) -> None:
        self.e = engine

    def process(self, step, decoded: Optional[torch.Tensor], prefilled: List[torch.Tensor]) -> None:
        """After a step's plan ran: advance every decoded choice and every prompt whose prefill ended (a resumed
        choice's prefill only restores its blocks: its pending token was sampled before its preemption)."""
        e = self.e
        order: List[Choice] = [] if step.drafts is not None else list(step.running)
        rows: List[torch.Tensor] = []
        if step.drafts is not None:
            spec_glue.verify(e, step.running, step.drafts, decoded)
        elif step.running:
            rows.append(decoded[torch.tensor([c.row for c in step.running], device=decoded.device)])
        for c, _, end in step.chunks:
            c.filled = end
        done = [(group, self.prefill_logits(group, logits)) for group, logits in zip(step.groups, prefilled)]
        done += [([c], [logits[-1]]) for (c, _, end), logits in zip(step.chunks, prefilled[len(step.groups):])
                 if end == len(c.tokens)]
        for group, last in done:
            for c, row_logits in zip(group, last):
                c.filled = len(c.tokens)
                e.prefix.keep(c, c.tokens)
                family = [c] + step.forks.get(c, [])
                for member in family:
                    member.prefilled = True
                if c.resumed:
                    c.resumed = False
                    continue
                order += family
                rows.append(row_logits.unsqueeze(0).expand(len(family), -1))
        self.advance(order, torch.cat(rows) if rows else None)

    def prefill_logits(self, group: List[Choice], logits: torch.Tensor) -> List[torch.Tensor]:
        """Each prompt's last-position logits; with every position's logits, its prompt log-probs go out first."""
        if not self.e.planner.all_logits(group[0]):
            return list(logits)
        out, start = [], 0
        for c in group:
            end = start + len(c.tokens)
            prompt = torch.tensor(c.tokens[1:], device=logits.device).unsqueeze(-1)
            lps = log_probs(logits[start:end - 1])
            values = lps.gather(-1, prompt).squeeze(-1).tolist()
            top = self.prompt_top(lps, c.request.params.logprobs)
            self.e.guarded(c, lambda c=c, v=values, t=top: self.emit(c, Chunk("", prompt_logprobs=[0.0] + v,
                                                                             prompt_top=t, index=c.index)))
            out.append(logits[end - 1])
            start = end
        return out

    def prompt_top(self, lps: torch.Tensor, k: Optional[int]) -> Optional[List[List[Tuple[str, List[int], float]]]]:
        """The k likeliest tokens at each prompt position after the first (None when no logprobs were asked)."""
        if k is None:
            return None
        if not k or not len(lps):
            return [[] for _ in range(len(lps) + 1)]
        values, ids = torch.topk(lps, k, dim=-1)
        return [[]] + [top_entries(self.e.tokenizer, v, i) for v, i in zip(values.tolist(), ids.tolist())]

    def advance(self, order: List[Choice], logits: Optional[torch.Tensor]) -> None:
        """Sample each choice's next token (rows of `logits` in `order`), emit, and finish choices."""
        e = self.e
        keep = [i for i, c in enumerate(order) if not c.done and c.request.params.max_tokens > 0]
        live = [order[i] for i in keep]
        if logits is not None and live:
            logits = logits[torch.tensor(keep, device=logits.device)] if len(keep) < len(order) else logits
            try:
                tokens = choose(logits, [c.sampler for c in live])
            except Exception as err:  # a sampler's own failure: sample row by row to find whose it was
                log.warning("batched sampling failed (%s); sampling row by row", err)
                tokens = [e.guarded(c, lambda c=c, i=i: choose(logits[i:i + 1], [c.sampler])[0])
                          for i, c in enumerate(live)]
            wanted = [i for i, c in enumerate(live) if c.request.params.logprobs is not None and tokens[i] is not None]
            lps = log_probs(logits[torch.tensor(wanted, device=logits.device)]) if wanted else None
            infos = {i: lps[j] for j, i in enumerate(wanted)}
            for i, c in enumerate(live):
                if tokens[i] is not None and not c.done:
                    e.guarded(c, lambda c=c, t=tokens[i], lp=infos.get(i): self.take(c, t, lp))
        for c in order:  # max_tokens 0: nothing to sample after the prefill
            if not c.done and c.request.params.max_tokens == 0:
                e.finish(c, "length")

    def take(self, c: Choice, token: int, lps: Optional[torch.Tensor]) -> None:
        """One sampled token of one choice: its log-prob entry, its text, its stop conditions, its event."""
        e = self.e
        params = c.request.params
        c.generated += 1
        c.sampler.record(token)
        if c.request.cancelled:
            return e.finish_cancelled(c)
        if (token in e.stop_ids and token not in params.ignore_stop_ids) or token in params.stop_token_ids:
            # the end: no entry, no text of its own
            self.show(c, c.stops.feed(c.text.finish())[0] + c.stops.flush(), [], final=True)
            return e.finish(c, "stop")
        if lps is not None:
            c.entries.append(self.token_logprob(lps, token, params.logprobs, c.text.offset))
        text, stopped = c.stops.feed(c.text.push(token))
        if stopped:
            self.show(c, text, [token], final=True, cut=True)
            return e.finish(c, "stop")
        position = len(c.request.prompt) + c.generated - 1  # where this token goes when decoded
        if c.generated >= params.max_tokens or position >= e.max_seq_len:
            more, stopped = c.stops.feed(c.text.finish())
            self.show(c, text + more + ("" if stopped else c.stops.flush()), [token], final=True, cut=stopped)
            return e.finish(c, "stop" if stopped else "length")
        self.show(c, text, [token])
        c.pending, c.position = token, position

    def show(self, c: Choice, text: str, tokens: List[int], final: bool = False, cut: bool = False) -> None:
        """Hand text to the sink with the log-prob entries of the tokens whose text starts in what is shown by
        now (a token whose text the stop strings still hold back keeps its entry back too). At the end the rest
        go as well, unless a stop string cut the text: entries past the cut are dropped."""
        c.shown += len(text)
        ready = [x for x in c.entries if x.offset < c.shown or (final and not cut)]
        c.entries = [] if final else c.entries[len(ready):]
        if text or ready or tokens:
            self.emit(c, Chunk(text, ready, tokens, index=c.index))

    def token_logprob(self, logprobs: torch.Tensor, token: int, k: int, offset: int) -> TokenLogprob:
        text, raw = token_text(self.e.tokenizer, token)
        top = []
        if k:
            values, ids = torch.topk(logprobs, k)
            top = top_entries(self.e.tokenizer, values.tolist(), ids.tolist())
        return TokenLogprob(text, raw, float(logprobs[token]), top, offset)

    def emit(self, c: Choice, event: Event) -> None:
        try:
            c.request.sink(event)
        except Exception:  # a broken sink ends its own request, never the others
            log.exception("request %s: its event sink failed; cancelling it", c.request.id)
            c.request.cancelled = True
