"""Choosing the next token: greedy at temperature 0, otherwise temperature plus nucleus (top-p) sampling.

A temperature below GREEDY_BELOW counts as 0 (greedy): dividing logits by a denormal temperature such as 1e-40
overflows to inf and the softmax to NaN, while the answer such a temperature asks for is the greedy one anyway.
Sampled rows are scaled and normalised in float32 whatever the logits' dtype, so float16 logits cannot
overflow either.

Every rank calls this with identical logits and an identically seeded generator, so all ranks draw the
same tokens without communicating.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

GREEDY_BELOW = 1e-5  # temperatures under this are greedy (see the module docstring)


def check_sampling_args(temperature: float, top_p: float) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:  # nan fails too
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw from the smallest set of most likely tokens whose probabilities add up to at least p."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[(probs_sum - probs_sort) > p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, choice).squeeze(-1)


def next_token(logits: torch.Tensor, temperature: float, top_p: float,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, V) float logits -> (B,) token ids."""
    if temperature >= GREEDY_BELOW:
        return sample_top_p(torch.softmax(logits.float() / temperature, dim=-1), top_p, generator)
    return torch.argmax(logits, dim=-1)


def next_tokens(logits: torch.Tensor, temperatures: Sequence[float], top_ps: Sequence[float],
                generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids, row i drawn at its own temperature and top_p with its own generator.

    Row i gets exactly what `next_token(logits[i:i+1], temperatures[i], top_ps[i], generators[i])` gives (the
    same operations, row by row), so a request samples the same tokens whichever rows share its batch. Greedy
    rows take one argmax; sampled rows share the softmax, sort and nucleus cut, then draw with their own
    generator.
    """
    out = torch.argmax(logits, dim=-1)
    hot = [i for i, t in enumerate(temperatures) if t >= GREEDY_BELOW]
    if not hot:
        return out
    rows = torch.tensor(hot, device=logits.device)
    temps = torch.tensor([float(temperatures[i]) for i in hot], dtype=torch.float32, device=logits.device)
    probs = torch.softmax(logits[rows].float() / temps.unsqueeze(1), dim=-1)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    cut = torch.tensor([float(top_ps[i]) for i in hot], dtype=probs.dtype, device=logits.device).unsqueeze(1)
    probs_sort[(probs_sum - probs_sort) > cut] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    for j, i in enumerate(hot):
        choice = torch.multinomial(probs_sort[j:j + 1], num_samples=1, generator=generators[i])
        out[i] = probs_idx[j, choice[0, 0]]
    return out
